"""The flow log of the real pasta: every flow of a mixed run opens and closes in it, its
byte counts are those of sha256-checked transfers, it is what `pesto --flows` shows, and
it stays under its cap."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from integration.conftest import our_command, run, stop_pid, wait_for
from integration.guest.hostnet import socket_dir
from integration.test_policy import (
    ALLOWED4,
    ALLOWED6,
    DENIED4,
    ECHO,
    HTTP,
    NO_FORWARDS,
    PESTO,
    probe,
    services,  # noqa: F401 - the fixture
    start_pasta,
)
from integration.test_tcp import MIB, client, server, server_results

PY = sys.executable
XFER = str(Path(__file__).with_name("xfer.py"))
DIGEST_LINE = 65                        # xfer's answer: the hex SHA-256 and a newline


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def stop(pid: int) -> None:
    stop_pid(pid)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10, what="pasta to exit")


def test_every_flow_opens_and_closes_with_its_bytes(services, procs, tmp_path):  # noqa: F811
    topo = services
    flog = tmp_path / "flows.jsonl"
    with socket_dir() as d:
        ctl = str(d / "pasta.ctl")
        target, pid = start_pasta(topo, procs, tmp_path, "-c", ctl, "--flow-log", str(flog),
                                  "--deny", f"tcp:{DENIED4}",
                                  forwards=("-t", "none", "-u", "none", "-T", "5903",
                                            "-U", "none"))
        # tap, both ways, both families; every byte checked end to end
        s1 = server(procs, topo.router, ALLOWED4, "sink", MIB, seed=1, port=5901)
        assert client(target, ALLOWED4, "send", MIB, seed=1, port=5901)["ok"]
        s2 = server(procs, topo.router, ALLOWED6, "source", 2 * MIB, seed=2, port=5902)
        assert client(target, ALLOWED6, "recv", 2 * MIB, seed=2, port=5902)["ok"]
        # splice: the namespace's loopback to the host's
        s3 = server(procs, topo.host, "127.0.0.1", "sink", MIB, seed=3, port=5903)
        assert client(target, "127.0.0.1", "send", MIB, seed=3, port=5903)["ok"]
        for s in (s1, s2, s3):
            assert "error" not in server_results(s)[0]
        # UDP, ICMP, and a denied connection
        assert probe(target, "udp", ALLOWED4, ECHO)["reply"] == "probe"
        assert probe(target, "ping", ALLOWED4)["reply"] is True
        assert probe(target, "tcp", DENIED4, HTTP)["error"] == "ConnectionRefusedError"
        # the live UDP flow, as pesto shows it, is the record the log wrote when it opened
        live = json.loads(run([*PESTO, "--flows", "--json", ctl]).stdout)["flows"]
        udp_live = [f for f in live if f["proto"] == "udp"]
        assert len(udp_live) == 1, live
        stop(pid)
    got = records(flog)
    opens = {r["id"]: r for r in got if r["event"] == "open"}
    closes = {r["id"]: r for r in got if r["event"] == "close"}
    assert opens and opens.keys() == closes.keys(), got
    for fid, o in opens.items():
        c = closes[fid]
        assert {k: c[k] for k in o if k not in ("time", "event")} == {
            k: v for k, v in o.items() if k not in ("time", "event")}
        assert c["time"] >= o["time"] and c["duration"] >= 0
    u = udp_live[0]
    assert {k: opens[u["id"]][k] for k in ("proto", "path", "guest", "host", "inbound",
                                            "verdict", "rule")} == {
        k: u[k] for k in ("proto", "path", "guest", "host", "inbound", "verdict", "rule")}

    def one(**want) -> dict:
        found = [c for c in closes.values() if all(c[k] == v for k, v in want.items())]
        assert len(found) == 1, (want, got)
        return found[0]

    send = one(proto="tcp", path="tap", host=f"{ALLOWED4}:5901")
    assert (send["from_guest"], send["to_guest"]) == (MIB, DIGEST_LINE), send
    assert send["end"] == "fin" and send["verdict"] == "allow" and send["rule"] == "default allow"
    assert send["frames_from_guest"] > 0 and send["frames_to_guest"] > 0
    recv = one(proto="tcp", path="tap", host=f"[{ALLOWED6}]:5902")
    assert (recv["to_guest"], recv["from_guest"]) == (2 * MIB, DIGEST_LINE), recv
    spliced = one(proto="tcp", path="splice")
    assert (spliced["from_guest"], spliced["to_guest"]) == (MIB, DIGEST_LINE), spliced
    assert spliced["host"] == "127.0.0.1:5903" and spliced["rule"] == "forwarded port"
    dgram = one(proto="udp", host=f"{ALLOWED4}:{ECHO}")
    assert (dgram["from_guest"], dgram["to_guest"]) == (5, 5)
    assert (dgram["frames_from_guest"], dgram["frames_to_guest"]) == (1, 1)
    assert dgram["end"] == "exit"
    ping = one(proto="icmp", host=ALLOWED4)
    assert ping["frames_from_guest"] == 1 and ping["frames_to_guest"] == 1
    denied = one(proto="tcp", host=f"{DENIED4}:{HTTP}")
    assert denied["verdict"] == "deny" and denied["end"] == "denied"
    assert denied["rule"] == f"deny tcp:{DENIED4}"


def test_flow_log_stays_under_its_cap(services, procs, tmp_path):  # noqa: F811
    """Three batches of 50 connections, a flush (about 23 KB) apart: the third takes the
    file past its 64 KiB cap, which then keeps its newest half, in whole lines."""
    topo = services
    flog = tmp_path / "flows.jsonl"
    cap = 65536
    target, pid = start_pasta(topo, procs, tmp_path, "--flow-log", str(flog),
                              "--flow-log-size", str(cap))
    srv = server(procs, topo.router, ALLOWED4, "sink", 1000, seed=5, conns=150, port=5905)
    sizes = [0]
    for batch in range(3):
        assert client(target, ALLOWED4, "send", 1000, seed=5 + 50 * batch, parallel=50,
                      port=5905)["ok"]
        # the flow log's timer writes the batch at once, within a second
        wait_for(lambda: flog.stat().st_size != sizes[-1], timeout=5, what="a flush")
        sizes.append(flog.stat().st_size)
    sizes.pop(0)
    assert len(server_results(srv)) == 150
    stop(pid)
    assert sizes[0] < sizes[1] <= cap and sizes[2] < sizes[1], sizes    # shrunk once
    assert flog.stat().st_size <= cap
    got = records(flog)                        # whole lines only
    closes = [r for r in got if r["event"] == "close"]
    assert {r["id"] for r in closes} >= set(range(101, 151)), got[0]   # the newest kept
    assert all(r["to_guest"] == DIGEST_LINE and r["from_guest"] == 1000 for r in closes)


CONNECT = r'''
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"GET / HTTP/1.0\r\n\r\n")
while s.recv(4096):
    pass
s.close()
print("done", flush=True)
time.sleep(float(sys.argv[3]))
'''


def test_flow_log_on_stderr_within_a_second(services, procs):  # noqa: F811
    """--flow-log - with a command (pasta in the foreground): the records reach standard
    error by the flow log's timer, within about a second of the flow closing."""
    topo = services
    p = procs.start(topo.host.cmd(*our_command("pasta"), "--config-net", "-q",
                                  "--flow-log", "-", *NO_FORWARDS, "--", PY, "-c", CONNECT,
                                  ALLOWED4, str(HTTP), "4"), text=True)
    assert p.stdout.readline().strip() == "done"
    done = time.monotonic()
    got = []
    while len(got) < 2:
        line = p.stderr.readline()
        assert line, "standard error closed"
        if line.startswith("{"):
            got.append(json.loads(line))
    assert time.monotonic() - done < 2.0                 # not only at exit (4 s later)
    assert [r["event"] for r in got] == ["open", "close"]
    assert got[1]["host"] == f"{ALLOWED4}:{HTTP}" and got[1]["end"] in ("fin", "rst")
    body = f"hello from {ALLOWED4}\n"
    assert got[1]["to_guest"] == len(f"HTTP/1.0 200 OK\r\nContent-Length: {len(body)}\r\n"
                                     f"\r\n{body}")
    assert p.wait(15) == 0
