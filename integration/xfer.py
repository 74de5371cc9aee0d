"""Checked TCP transfers for integration tests: every byte is compared, both ways.

Run as a script inside whatever namespace a test needs (`ip netns exec`):

    xfer.py server --bind ADDR --port P --mode sink|source --size N --seed S [--conns K]
    xfer.py client --connect ADDR --port P --mode send|recv --size N --seed S [--parallel K]

Data is a deterministic pseudo-random stream from the seed (connection i of
a parallel run uses seed+i), so each side knows what the other must see.

- send (client) -> sink (server): the client sends N bytes and shuts down
  its write side; the server reads to end of file and answers with the
  SHA-256 of what it got; the client compares it with its own.
- recv (client) <- source (server): the server sends N bytes and shuts down
  its write side (a half-close); the client reads to end of file, checks the
  SHA-256, then still sends a confirmation that the server must receive
  after its own FIN.

The client prints one JSON line and exits 0 only if every connection matched.
The server prints one JSON line per connection it served.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import sys
import threading
import time

CHUNK = 1 << 20


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def family_of(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def read_all(sock: socket.socket) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        got = sock.recv_into(view)
        if not got:
            return n, h.hexdigest()
        h.update(view[:got])
        n += got


def serve_one(conn: socket.socket, args: argparse.Namespace, seed: int) -> dict:
    conn.settimeout(args.timeout)
    try:
        if args.mode == "sink":
            n, digest = read_all(conn)
            conn.sendall(digest.encode() + b"\n")
            conn.shutdown(socket.SHUT_WR)
            return {"received": n, "sha256": digest}
        data = payload(seed, args.size)
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        confirmation = b""
        while True:
            chunk = conn.recv(4096)
            if not chunk:
                break
            confirmation += chunk
        want = hashlib.sha256(data).hexdigest()
        return {"sent": len(data), "confirmed": confirmation.decode().strip() == want}
    except OSError as exc:
        return {"error": str(exc)}
    finally:
        conn.close()


def server(args: argparse.Namespace) -> int:
    ls = socket.socket(family_of(args.bind), socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if ls.family == socket.AF_INET6:
        ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    ls.bind((args.bind, args.port))
    ls.listen(1024)
    print(json.dumps({"listening": args.port}), flush=True)
    threads = []
    results: list[dict] = []
    lock = threading.Lock()
    for i in range(args.conns):
        conn, peer = ls.accept()

        def run(c=conn, s=args.seed + i, who=peer[0]) -> None:
            r = serve_one(c, args, s)
            r["peer"] = who             # the source address this side saw
            with lock:
                results.append(r)
                print(json.dumps(r), flush=True)

        t = threading.Thread(target=run)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return 0 if all("error" not in r for r in results) else 1


def client_one(args: argparse.Namespace, seed: int) -> dict:
    s = socket.socket(family_of(args.connect), socket.SOCK_STREAM)
    s.settimeout(args.timeout)
    t0 = time.monotonic()
    try:
        # through getaddrinfo, so that a scope ("fe80::1%tap0") reaches the sockaddr
        s.connect(socket.getaddrinfo(args.connect, args.port, s.family,
                                     socket.SOCK_STREAM)[0][4])
        if args.mode == "send":
            data = payload(seed, args.size)
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
            ok = reply.decode().strip() == hashlib.sha256(data).hexdigest()
            return {"ok": ok, "bytes": len(data), "seconds": time.monotonic() - t0}
        n, digest = read_all(s)
        ok = digest == hashlib.sha256(payload(seed, args.size)).hexdigest() and n == args.size
        s.sendall(digest.encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        s.recv(1)
        return {"ok": ok, "bytes": n, "seconds": time.monotonic() - t0}
    except OSError as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        s.close()


def client(args: argparse.Namespace) -> int:
    results: list[dict | None] = [None] * args.parallel

    def run(i: int) -> None:
        results[i] = client_one(args, args.seed + i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(args.parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [r for r in results if not r or not r.get("ok")]
    total = sum(r.get("bytes", 0) for r in results if r)
    print(json.dumps({"ok": not failed, "connections": len(results), "bytes": total,
                      "failures": failed[:5]}), flush=True)
    return 0 if not failed else 1


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="role", required=True)
    for role in ("server", "client"):
        sp = sub.add_parser(role)
        sp.add_argument("--port", type=int, required=True)
        sp.add_argument("--size", type=int, default=1 << 20)
        sp.add_argument("--seed", type=int, default=1)
        sp.add_argument("--timeout", type=float, default=60.0)
        if role == "server":
            sp.add_argument("--bind", required=True)
            sp.add_argument("--mode", choices=("sink", "source"), required=True)
            sp.add_argument("--conns", type=int, default=1)
        else:
            sp.add_argument("--connect", required=True)
            sp.add_argument("--mode", choices=("send", "recv"), required=True)
            sp.add_argument("--parallel", type=int, default=1)
    args = p.parse_args()
    return server(args) if args.role == "server" else client(args)


if __name__ == "__main__":
    sys.exit(main())
