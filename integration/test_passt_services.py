"""Host-side services for the passt guest tests, and checks that they work on their own.

Run as a script inside the namespace a test needs (`ip netns exec NS python3 THIS ...`):

    serve --results FILE [--tcp ADDR,PORT,sink|source ...] [--tftp ADDR,PORT] --size N --seed S
    get --connect ADDR,PORT --results FILE --tag T [--deadline SEC]
    put --connect ADDR,PORT --results FILE --tag T --size N --seed S [--deadline SEC]

What the busybox guest can speak decides the protocols:

- TCP `sink`: read to end of file (busybox `nc HOST PORT < FILE` half-closes
  after its input), answer the SHA-256 in hex and close.
- TCP `source`: send N deterministic bytes (from the seed), half-close, drain.
- TFTP (RFC 1350, with the RFC 2347/2348 blksize option that `tftp -b`
  asks for) is lock-step and so loss-free over UDP: a read request gets the
  same N bytes, a write request is stored and hashed.  Every reply comes
  from the server's own port (a TFTP server may pick any port: keeping one
  makes the test independent of how UDP replies from new ports are handled).
- `get`/`put` are the host-side clients for ports forwarded into the guest
  (busybox `nc -l -p PORT -e ...` there); they retry until the guest listens.

Every finished transfer appends one JSON line to the results file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

_lock = threading.Lock()


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def record(results: str, **entry) -> None:
    with _lock, open(results, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()


def read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _addr(text: str) -> tuple[str, int]:
    host, port = text.rsplit(",", 1)
    return host, int(port)


# ---------------------------------------------------------------- TCP


def _drain(conn: socket.socket) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    while True:
        chunk = conn.recv(1 << 16)
        if not chunk:
            return n, h.hexdigest()
        h.update(chunk)
        n += len(chunk)


def _serve_tcp(addr: str, port: int, mode: str, data: bytes, results: str) -> None:
    ls = socket.socket(_family(addr), socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if ":" in addr:
        ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    ls.bind((addr, port))
    ls.listen(16)
    while True:
        conn, peer = ls.accept()
        threading.Thread(target=_tcp_conn, args=(conn, peer, addr, port, mode, data, results),
                         daemon=True).start()


def _tcp_conn(conn, peer, addr, port, mode, data, results) -> None:
    conn.settimeout(300)
    started = time.monotonic()
    try:
        if mode == "sink":
            n, sha = _drain(conn)
            conn.sendall(sha.encode() + b"\n")
        else:
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            _drain(conn)
            n, sha = len(data), hashlib.sha256(data).hexdigest()
        record(results, svc=f"tcp-{mode}", addr=addr, port=port, peer=peer[0], n=n, sha=sha,
               seconds=round(time.monotonic() - started, 3))
    except OSError as exc:
        record(results, svc=f"tcp-{mode}", addr=addr, port=port, peer=peer[0], error=str(exc))
    finally:
        conn.close()


# ---------------------------------------------------------------- TFTP

RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6
TFTP_TIMEOUT = 1.0
TFTP_RETRIES = 10


def _parse_request(pkt: bytes) -> tuple[str, dict[str, str]]:
    fields = pkt[2:].split(b"\0")
    name = fields[0].decode()
    opts = {}
    rest = fields[2:]
    for i in range(0, len(rest) - 1, 2):
        if rest[i]:
            opts[rest[i].decode().lower()] = rest[i + 1].decode()
    return name, opts


class TftpServer:
    def __init__(self, addr: str, port: int, data: bytes, results: str) -> None:
        self.sock = socket.socket(_family(addr), socket.SOCK_DGRAM)
        self.sock.bind((addr, port))
        self.data = data
        self.results = results
        self.addr = addr

    def serve(self) -> None:
        while True:
            self.sock.settimeout(None)
            pkt, peer = self.sock.recvfrom(70000)
            if len(pkt) < 4:
                continue
            op = struct.unpack_from("!H", pkt)[0]
            if op not in (RRQ, WRQ):
                continue
            name, opts = _parse_request(pkt)
            blksize = 512
            oack = b""
            if "blksize" in opts:
                blksize = max(8, min(int(opts["blksize"]), 65464))
                oack = struct.pack("!H", OACK) + b"blksize\0" + str(blksize).encode() + b"\0"
            started = time.monotonic()
            try:
                if op == RRQ:
                    self._send_file(peer, blksize, oack)
                    n, sha = len(self.data), hashlib.sha256(self.data).hexdigest()
                else:
                    n, sha = self._receive_file(peer, blksize, oack)
                record(self.results, svc="tftp-" + ("read" if op == RRQ else "write"),
                       name=name, peer=peer[0], n=n, sha=sha, blksize=blksize,
                       seconds=round(time.monotonic() - started, 3))
            except TimeoutError as exc:
                record(self.results, svc="tftp", name=name, peer=peer[0], error=str(exc))

    def _exchange(self, peer, pkt: bytes, want_op: int, want_block: int) -> bytes:
        """Send pkt (again on timeout) until the peer answers want_op for want_block."""
        for _ in range(TFTP_RETRIES):
            if pkt:
                self.sock.sendto(pkt, peer)
            deadline = time.monotonic() + TFTP_TIMEOUT
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.sock.settimeout(left)
                try:
                    reply, src = self.sock.recvfrom(70000)
                except TimeoutError:
                    break
                if src[:2] != peer[:2] or len(reply) < 4:
                    continue
                op, block = struct.unpack_from("!HH", reply)
                if op == ERROR:
                    raise TimeoutError(f"client error: {reply[4:-1]!r}")
                if op == want_op and block == want_block:
                    return reply
        raise TimeoutError(f"no answer for block {want_block}")

    def _send_file(self, peer, blksize: int, oack: bytes) -> None:
        if oack:
            self._exchange(peer, oack, ACK, 0)
        block = 1
        pos = 0
        while True:
            chunk = self.data[pos:pos + blksize]
            self._exchange(peer, struct.pack("!HH", DATA, block & 0xFFFF) + chunk, ACK,
                           block & 0xFFFF)
            pos += blksize
            block += 1
            if len(chunk) < blksize:
                return

    def _receive_file(self, peer, blksize: int, oack: bytes) -> tuple[int, str]:
        h = hashlib.sha256()
        n = 0
        ack = oack or struct.pack("!HH", ACK, 0)
        block = 1
        while True:
            reply = self._exchange(peer, ack, DATA, block & 0xFFFF)
            chunk = reply[4:]
            h.update(chunk)
            n += len(chunk)
            ack = struct.pack("!HH", ACK, block & 0xFFFF)
            block += 1
            if len(chunk) < blksize:
                self.sock.sendto(ack, peer)
                return n, h.hexdigest()


# ---------------------------------------------------------------- forwarded-port clients


def client(kind: str, addr: str, port: int, results: str, tag: str, data: bytes,
           deadline: float) -> int:
    """Connect until the guest answers; `get` reads everything, `put` sends data and
    reads back the guest's SHA-256."""
    end = time.monotonic() + deadline
    attempts = 0
    while time.monotonic() < end:
        attempts += 1
        s = socket.socket(_family(addr), socket.SOCK_STREAM)
        s.settimeout(60)
        try:
            s.connect((addr, port))
            if kind == "get":
                n, sha = _drain(s)
                if n:
                    record(results, svc="fwd-get", tag=tag, n=n, sha=sha, attempts=attempts)
                    return 0
            else:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                answer = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
                words = answer.split()
                if words and len(words[0]) == 64:
                    record(results, svc="fwd-put", tag=tag, n=len(data),
                           sent_sha=hashlib.sha256(data).hexdigest(),
                           guest_sha=words[0].decode(), attempts=attempts)
                    return 0
        except OSError:
            pass
        finally:
            s.close()
        time.sleep(0.5)
    record(results, svc=f"fwd-{kind}", tag=tag, error=f"gave up after {attempts} attempts")
    return 1


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=("serve", "get", "put"))
    p.add_argument("--results", required=True)
    p.add_argument("--tcp", action="append", default=[])
    p.add_argument("--tftp", action="append", default=[])
    p.add_argument("--connect")
    p.add_argument("--tag", default="")
    p.add_argument("--size", type=int, default=1 << 20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--deadline", type=float, default=180.0)
    a = p.parse_args(argv)
    data = payload(a.seed, a.size)
    if a.command in ("get", "put"):
        host, port = _addr(a.connect)
        return client(a.command, host, port, a.results, a.tag, data, a.deadline)
    threads = []
    for spec in a.tcp:
        addr, port, mode = spec.split(",")
        threads.append(threading.Thread(target=_serve_tcp,
                                        args=(addr, int(port), mode, data, a.results),
                                        daemon=True))
    for spec in a.tftp:
        addr, port = _addr(spec)
        threads.append(threading.Thread(target=TftpServer(addr, port, data, a.results).serve,
                                        daemon=True))
    for t in threads:
        t.start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


# ---------------------------------------------------------------- self-checks


def test_tftp_and_tcp_services_with_busybox_clients(tmp_path: Path) -> None:
    """The services against busybox's own tftp and nc, on this machine's loopback."""
    import shutil

    import pytest

    from integration.conftest import wait_for

    if shutil.which("busybox") is None:
        pytest.fail("busybox is not installed (tools/test.sh installs busybox-static)")
    results = tmp_path / "results.jsonl"
    size, seed = 300_000, 7
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        base = probe.getsockname()[1]
    srv = subprocess.Popen([sys.executable, __file__, "serve", "--results", str(results),
                            "--tcp", f"127.0.0.1,{base},sink",
                            "--tcp", f"127.0.0.1,{base + 1},source",
                            "--tftp", f"127.0.0.1,{base + 2}",
                            "--size", str(size), "--seed", str(seed)],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        data = payload(seed, size)
        up = tmp_path / "up"
        up.write_bytes(data[::-1])
        bb = "busybox"
        subprocess.run([bb, "tftp", "-b", "8192", "-p", "-l", str(up), "-r", "up",
                        "127.0.0.1", str(base + 2)], check=True, timeout=30)
        subprocess.run([bb, "tftp", "-b", "1428", "-g", "-l", str(tmp_path / "down"), "-r",
                        "down", "127.0.0.1", str(base + 2)], check=True, timeout=30)
        assert (tmp_path / "down").read_bytes() == data
        with open(up, "rb") as f:
            r = subprocess.run([bb, "nc", "127.0.0.1", str(base)], stdin=f,
                               capture_output=True, timeout=30, check=True)
        assert r.stdout.decode().strip() == hashlib.sha256(data[::-1]).hexdigest()
        r = subprocess.run([bb, "nc", "127.0.0.1", str(base + 1)], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=30, check=True)
        assert r.stdout == data
        svcs = ("tftp-write", "tftp-read", "tcp-sink", "tcp-source")

        def every_result() -> dict | None:
            got = {e["svc"]: e for e in read_results(results)}
            return got if all(k in got for k in svcs) else None

        got = wait_for(every_result, timeout=5, what="the services' results")
        assert got["tftp-write"]["sha"] == hashlib.sha256(data[::-1]).hexdigest()
        assert got["tftp-write"]["blksize"] == 8192
        assert got["tftp-read"]["n"] == size
        assert got["tcp-sink"]["n"] == size and got["tcp-source"]["n"] == size
    finally:
        srv.kill()
        srv.wait()
        srv.stdout.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
