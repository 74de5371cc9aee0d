"""Bound-port scans of /proc/net/{tcp,tcp6,udp,udp6} (common.procnet).

tests/data/procnet/ holds tables captured on a little-endian Debian 12 host
(kernel 6.x) while these sockets were open, next to whatever the host had:

  TCP listen  127.0.0.1:47001  0.0.0.0:47002  ::1:47003  [::]:47004 (dual-stack)
              [::]:47005 (v6only)  192.0.2.2:47006  ::ffff:127.0.0.1:47008  fd00::2:47009
  TCP other   127.0.0.2:47007 bound only (not in the tables); established
              127.0.0.1 and ::1 connections to 47001/47003; TIME_WAIT leftovers
  UDP bound   127.0.0.1:47011  0.0.0.0:47012  ::1:47013  [::]:47014
              ::ffff:127.0.0.1:47017  192.0.2.2:47018  fe80::fc:ff:fe00:1%eth0:47019
  UDP other   connected 127.0.0.1:47015 -> 47011 and ::1:47016 -> 47013
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from ipaddress import ip_address
from pathlib import Path

import pytest

from common.procnet import (
    ProcNetFile,
    bound_ports,
    decode_addr,
    listening_ports,
    scan_ports,
)

DATA = Path(__file__).parent / "data" / "procnet"


def table(name: str) -> bytes:
    return (DATA / name).read_bytes()


def pairs(*items):
    return {(ip_address(a), p) for a, p in items}


CAPTURED = {
    "tcp": pairs(("0.0.0.0", 2024), ("127.0.0.1", 47001), ("0.0.0.0", 47002),
                 ("192.0.2.2", 47006)),
    "tcp6": pairs(("::ffff:127.0.0.1", 47008), ("::1", 47003), ("fd00::2", 47009),
                  ("::", 47004), ("::", 47005)),
    "udp": pairs(("127.0.0.1", 47011), ("0.0.0.0", 47012), ("192.0.2.2", 47018)),
    "udp6": pairs(("::1", 47013), ("::", 47014), ("::ffff:127.0.0.1", 47017),
                  ("fe80::fc:ff:fe00:1", 47019)),
}


@pytest.mark.parametrize("name", sorted(CAPTURED))
def test_captured_tables(name):
    proto = name.rstrip("6")
    assert listening_ports(table(name), proto, byteorder="little") == CAPTURED[name]
    assert bound_ports(table(name), proto) == {p for _a, p in CAPTURED[name]}


def test_text_and_bytes_agree():
    text = table("tcp6").decode()
    assert listening_ports(text, "tcp", "little") == listening_ports(table("tcp6"), "tcp",
                                                                     "little")


def test_wrong_proto_finds_other_states():
    # the UDP table read as TCP: no line is in LISTEN (0A)
    assert bound_ports(table("udp"), "tcp") == set()
    with pytest.raises(ValueError):
        bound_ports(table("udp"), "sctp")


def test_decode_addr():
    assert decode_addr("0100007F", "little") == ip_address("127.0.0.1")
    assert decode_addr(b"020200C0", "little") == ip_address("192.0.2.2")
    assert decode_addr("7F000001", "big") == ip_address("127.0.0.1")
    assert decode_addr("00000000000000000000000001000000", "little") == ip_address("::1")
    assert decode_addr("000080FE00000000FF00FC00010000FE", "little") == \
        ip_address("fe80::fc:ff:fe00:1")
    assert decode_addr("FE800000000000000000000000000001", "big") == ip_address("fe80::1")
    with pytest.raises(ValueError):
        decode_addr("0100", "little")


HEADER = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
          "   uid  timeout inode\n")


def line(n, local, remote="00000000:0000", state="0A"):
    return (f"{n:4}: {local} {remote} {state} 00000000:00000000 00:00000000 00000000"
            f"     0        0 1000 1 0000000000000000 100 0 0 10 0\n")


def test_states_and_malformed_lines():
    text = HEADER + "".join([
        line(0, "0100007F:0016"),                              # listen: kept
        line(1, "0100007F:0017", state="01"),                  # established
        line(2, "0100007F:0018", state="07"),                  # closed / bound UDP
        line(3, "0100007F:0000"),                              # port 0: never
        "garbage\n", "   4: 0100007F:0019\n",                  # truncated
        line(5, "0100007F:001A", state="0A")[:-1],             # no final newline
    ])
    assert bound_ports(text, "tcp") == {0x16, 0x1A}
    assert bound_ports(text, "udp") == {0x18}
    assert listening_ports(text, "tcp", "little") == pairs(("127.0.0.1", 22),
                                                           ("127.0.0.1", 26))
    assert bound_ports("", "tcp") == set()


def test_reader_on_captured_files():
    for name, expected in CAPTURED.items():
        with ProcNetFile(DATA / name) as f:        # proto from the file name
            assert f.proto == name.rstrip("6")
            assert f.ports() == {p for _a, p in expected}
            assert f.ports() == {p for _a, p in expected}      # re-read from 0


def test_reader_needs_proto_for_other_names(tmp_path):
    path = tmp_path / "listeners"
    path.write_text(HEADER)
    with pytest.raises(ValueError, match="pass proto"):
        ProcNetFile(path)
    with ProcNetFile(path, "udp") as f:
        assert f.ports() == set()
    with pytest.raises(ValueError):
        ProcNetFile.open("raw")


def test_reader_sees_rewrites_of_the_same_file(tmp_path):
    path = tmp_path / "t"
    path.write_text(HEADER + line(0, "0100007F:0016"))
    f = open(path, "rb")                           # the reader owns and closes it
    reader = ProcNetFile(f, "tcp")
    assert reader.ports() == {22}
    with open(path, "r+") as w:                    # same inode, new content
        w.write(HEADER + line(0, "00000000:0050") + line(1, "00000000:0051"))
    assert reader.ports() == {80, 81}
    reader.close()
    assert f.closed


def test_reader_big_table_is_cheap(tmp_path):
    # thousands of established connections and a few listeners, as on a busy host
    rows = [line(i, f"0100007F:{1024 + i:04X}", "0100007F:0050", "01") for i in range(8000)]
    rows[::1000] = [line(i, f"00000000:{i + 1:04X}") for i in range(0, 8000, 1000)]
    path = tmp_path / "tcp"
    path.write_text(HEADER + "".join(rows))
    with ProcNetFile(path) as f:
        assert f.ports() == {i + 1 for i in range(0, 8000, 1000)}
        start = time.perf_counter()
        for _ in range(20):
            f.ports()
        per_scan = (time.perf_counter() - start) / 20
    assert per_scan < 0.05, f"{per_scan * 1e3:.1f} ms per scan of 8000 lines"


# ---------------------------------------------------------------- live


def _listen(family, addr, kind=socket.SOCK_STREAM, v6only=None, connect=None):
    s = socket.socket(family, kind)
    if v6only is not None:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
    s.bind((addr, 0))
    if kind == socket.SOCK_STREAM:
        s.listen()
    if connect is not None:
        s.connect(connect)
    return s


def test_live_sockets_are_found():
    v4, v6 = socket.AF_INET, socket.AF_INET6
    tcp = [_listen(v4, "127.0.0.1"), _listen(v4, "0.0.0.0"), _listen(v6, "::1"),
           _listen(v6, "::", v6only=0)]
    udp = [_listen(v4, "127.0.0.1", socket.SOCK_DGRAM), _listen(v4, "0.0.0.0", socket.SOCK_DGRAM),
           _listen(v6, "::1", socket.SOCK_DGRAM), _listen(v6, "::", socket.SOCK_DGRAM, v6only=1)]
    connected = _listen(v4, "127.0.0.1", socket.SOCK_DGRAM,
                        connect=udp[0].getsockname()[:2])
    bound_only = socket.socket(v4, socket.SOCK_STREAM)
    bound_only.bind(("127.0.0.1", 0))
    client = socket.create_connection(tcp[0].getsockname()[:2])
    server, _ = tcp[0].accept()
    opened = tcp + udp + [connected, bound_only, client, server]
    try:
        readers = {name: ProcNetFile.open(name) for name in ("tcp", "tcp6", "udp", "udp6")}
        found = {name: r.sockets() for name, r in readers.items()}
        for s, name in zip(tcp + udp, ["tcp", "tcp", "tcp6", "tcp6",
                                       "udp", "udp", "udp6", "udp6"], strict=True):
            addr, port = s.getsockname()[:2]
            assert (ip_address(addr), port) in found[name], (name, addr, port)
        tcp_ports = scan_ports([readers["tcp"], readers["tcp6"]])
        udp_ports = scan_ports([readers["udp"], readers["udp6"]])
        assert {s.getsockname()[1] for s in tcp} <= tcp_ports
        assert {s.getsockname()[1] for s in udp} <= udp_ports
        assert connected.getsockname()[1] not in udp_ports
        assert bound_only.getsockname()[1] not in tcp_ports
        assert client.getsockname()[1] not in tcp_ports

        # the same open files, re-read: a closed listener disappears, a new one shows
        gone = tcp.pop(1)
        gone_port = gone.getsockname()[1]
        gone.close()
        fresh = _listen(v4, "127.0.0.1")
        tcp.append(fresh)
        now = readers["tcp"].ports()
        assert gone_port not in now
        assert fresh.getsockname()[1] in now
        for r in readers.values():
            r.close()
    finally:
        for s in opened + tcp[-1:]:
            s.close()


def test_live_table_longer_than_a_page():
    # the kernel hands a /proc/net table out one page at a time
    listeners = [_listen(socket.AF_INET, "127.0.0.1") for _ in range(80)]
    try:
        wanted = {s.getsockname()[1] for s in listeners}
        with ProcNetFile.open("tcp") as f:
            data = f.read()
            assert len(data) > 2 * os.sysconf("SC_PAGE_SIZE")
            assert data.count(b"\n") >= 81
            assert wanted <= f.ports()
            assert f.ports() == bound_ports(Path("/proc/net/tcp").read_bytes(), "tcp")
    finally:
        for s in listeners:
            s.close()


_CHILD = r"""
import array, os, socket, sys
chan = socket.socket(fileno=int(sys.argv[1]))
fd = os.open("/proc/net/tcp", os.O_RDONLY)
lsn = socket.socket()
lsn.bind(("0.0.0.0", 0))
lsn.listen()
chan.sendmsg([str(lsn.getsockname()[1]).encode()],
             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
chan.recv(1)
"""


def test_file_opened_in_another_namespace_keeps_showing_it():
    if os.geteuid() != 0:
        pytest.fail("needs root to unshare a network namespace")
    ours, theirs = socket.socketpair()
    try:
        child = subprocess.Popen(["unshare", "--net", sys.executable, "-c", _CHILD,
                                  str(theirs.fileno())], pass_fds=[theirs.fileno()])
    except FileNotFoundError:
        pytest.fail("no unshare(1)")
    theirs.close()
    try:
        ours.settimeout(10)
        msg, fds, _flags, _addr = socket.recv_fds(ours, 16, 1)
        if not fds:
            pytest.fail("child could not create a namespace")
        port = int(msg)
        with ProcNetFile(fds[0], "tcp") as theirs_tcp, ProcNetFile.open("tcp") as our_tcp:
            assert theirs_tcp.ports() == {port}             # a fresh namespace: only it
            assert theirs_tcp.sockets() == pairs(("0.0.0.0", port))
            ours.send(b"x")                                 # child exits, listener gone
            child.wait(10)
            assert theirs_tcp.ports() == set()
            our_tcp.ports()                                 # ours still readable
    finally:
        ours.close()
        if child.poll() is None:
            child.kill()
            child.wait()
