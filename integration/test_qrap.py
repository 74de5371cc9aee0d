"""qrap against either passt, without QEMU: probe, hand-over of the descriptor, exec.

Each run gets a private /tmp (a bind mount of a test directory) so that the
probed /tmp/passt_N.socket names are ours alone.  In place of QEMU, qrap
execs a small Python client that speaks the stream protocol on the
descriptor it inherited: an ARP request must get its reply, which also shows
that the stream starts on a frame boundary after the probe.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from integration.conftest import GW4, HOST4, our_command
from integration.guest.hostnet import socket_dir

CLIENT = r"""
import json, os, socket, struct, sys, time
fd = int(sys.argv[1])
s = socket.socket(fileno=fd)
mac = bytes.fromhex("525400123456")
body = (struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + socket.inet_aton(sys.argv[2])
        + bytes(6) + socket.inet_aton(sys.argv[3]))
frame = b"\xff" * 6 + mac + b"\x08\x06" + body
s.sendall(struct.pack("!I", len(frame)) + frame)
data, frames, end = b"", [], time.monotonic() + 3
s.settimeout(0.2)
while time.monotonic() < end:
    try:
        chunk = s.recv(65536)
    except TimeoutError:
        chunk = None
    if chunk == b"":
        break
    data += chunk or b""
    while len(data) >= 4 and len(data) >= 4 + struct.unpack_from("!I", data)[0]:
        n = struct.unpack_from("!I", data)[0]
        frames.append(data[4:4 + n].hex())
        data = data[4 + n:]
    if any(f[24:28] == "0806" and f[40:44] == "0002"
           and f[76:84] == socket.inet_aton(sys.argv[2]).hex() for f in frames):
        break
print(json.dumps({"args": sys.argv[4:], "frames": frames, "left": data.hex(),
                  "inheritable": os.get_inheritable(fd)}))
"""


@pytest.fixture
def private_tmp() -> Path:
    with socket_dir() as d:
        yield d


def in_private_tmp(ns, tmpdir: Path, *cmd: str) -> list[str]:
    return ns.cmd("unshare", "--mount", "--propagation", "private", "sh", "-c",
                  'mount --bind "$0" /tmp && exec "$@"', str(tmpdir), *cmd)


def wait_serving(p) -> None:
    """Until passt says it serves: its socket listens long before, and qrap's probe
    gives up after 0.5 s."""
    while True:
        line = p.stderr.readline()
        assert line, f"passt exited ({p.wait()}) before serving"
        if b"UNIX domain socket bound at" in line:
            return


def start_passt(topo, procs, tmpdir: Path, passt: list[str]):
    p = procs.start(in_private_tmp(topo.host, tmpdir, *passt, "-f", "-s",
                                   "/tmp/passt_1.socket"))
    wait_serving(p)
    return p


def run_qrap(topo, tmpdir: Path, qrap: list[str], client: Path, *extra: str):
    cmd = [*qrap, "5", client.name, "5", HOST4, GW4, *extra]
    env = dict(os.environ, PATH=f"{client.parent}:{os.environ['PATH']}")
    return subprocess.run(in_private_tmp(topo.host, tmpdir, *cmd), capture_output=True,
                          text=True, timeout=120, env=env)


def arp_reply_in(frames: list[str]) -> bool:
    return any(f[24:28] == "0806" and f[40:44] == "0002" and f[76:84] == "0a4d0002"
               for f in frames)


@pytest.fixture
def client() -> Path:
    """The stand-in for QEMU, by name in $PATH (C qrap looks QEMU_CMD up there).
    Outside /tmp: the private /tmp hides everything else."""
    d = Path(tempfile.mkdtemp(prefix="qrap-test-", dir="/var/tmp"))
    path = d / "qemu-standin"
    path.write_text(f"#!{sys.executable}\n{CLIENT}")
    path.chmod(0o755)
    yield path
    shutil.rmtree(d)


PASSTS = {"ours": lambda: our_command("passt"), "C": lambda: ["passt"]}
QRAPS = {"ours": lambda: our_command("qrap"), "C": lambda: ["qrap"]}


@pytest.mark.parametrize("qrap_kind, passt_kind",
                         [("ours", "ours"), ("C", "ours"), ("ours", "C")])
def test_qrap_hands_a_framed_stream_to_its_command(topo, procs, private_tmp, client,
                                                   qrap_kind, passt_kind):
    if shutil.which("passt") is None or shutil.which("qrap") is None:
        pytest.fail("C passt/qrap not installed (tools/test.sh installs them)")
    passt = start_passt(topo, procs, private_tmp, PASSTS[passt_kind]())
    r = run_qrap(topo, private_tmp, QRAPS[qrap_kind](), client,
                 "-netdev", "socket,fd=5,id=n0")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "Connected to /tmp/passt_1.socket" in r.stderr
    assert out["inheritable"] is True
    assert arp_reply_in(out["frames"]), out
    assert out["left"] == ""
    # qrap passes QEMU's arguments on untouched when they already name the descriptor
    assert out["args"] == ["-netdev", "socket,fd=5,id=n0"]
    passt.send_signal(signal.SIGTERM)


def test_our_qrap_skips_busy_and_dead_sockets(topo, procs, private_tmp, client):
    # passt_1: a stale socket (refused); passt_2: passt serving another guest; passt_3: ours
    import socket

    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(private_tmp / "passt_1.socket"))
    passt = our_command("passt")
    p2 = procs.start(in_private_tmp(topo.host, private_tmp, *passt, "-f", "-s",
                                    "/tmp/passt_2.socket"))
    wait_serving(p2)
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.connect(str(private_tmp / "passt_2.socket"))
    p3 = procs.start(in_private_tmp(topo.host, private_tmp, *passt, "-f", "-s",
                                    "/tmp/passt_3.socket"))
    wait_serving(p3)
    try:
        r = run_qrap(topo, private_tmp, our_command("qrap"), client)
        assert r.returncode == 0, r.stderr
        assert "Connected to /tmp/passt_3.socket" in r.stderr
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert arp_reply_in(out["frames"])
        # no -netdev given: qrap adds one for descriptor 5
        assert out["args"][-4:] == ["-device", "virtio-net-pci,netdev=hostnet0",
                                    "-netdev", "socket,fd=5,id=hostnet0"]
    finally:
        busy.close()
        stale.close()
        for p in (p2, p3):
            p.send_signal(signal.SIGTERM)


def test_our_qrap_without_passt_fails_quickly(topo, private_tmp, client):
    r = run_qrap(topo, private_tmp, our_command("qrap"), client)
    assert r.returncode == 1
    assert "no passt found" in r.stderr
