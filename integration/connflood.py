"""Many concurrent TCP connections, for the scale test.

    connflood.py server --bind ADDR --port P
        echo server for thousands of connections (selectors, one process)
    connflood.py client --connect ADDR --port P --count N --extra M
        opens N connections and checks each echoes; prints READY and waits for a
        line on stdin; then tries M more connections (counting refusals); then
        checks that all N first ones still echo; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys


def server(args: argparse.Namespace) -> int:
    family = socket.AF_INET6 if ":" in args.bind else socket.AF_INET
    ls = socket.socket(family, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((args.bind, args.port))
    ls.listen(4096)
    ls.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(ls, selectors.EVENT_READ)
    print("LISTENING", flush=True)
    while True:
        for key, _ in sel.select():
            if key.fileobj is ls:
                while True:
                    try:
                        c, _ = ls.accept()
                    except BlockingIOError:
                        break
                    c.setblocking(False)
                    sel.register(c, selectors.EVENT_READ)
                continue
            c = key.fileobj
            try:
                data = c.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionError:
                data = b""
            if not data:
                sel.unregister(c)
                c.close()
                continue
            c.sendall(data)


def echo_ok(s: socket.socket, token: bytes) -> bool:
    try:
        s.sendall(token)
        got = b""
        while len(got) < len(token):
            chunk = s.recv(64)
            if not chunk:
                return False
            got += chunk
        return got == token
    except OSError:
        return False


def client(args: argparse.Namespace) -> int:
    family = socket.AF_INET6 if ":" in args.connect else socket.AF_INET
    conns = []
    for _ in range(args.count):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect((args.connect, args.port))
        conns.append(s)
    first = sum(echo_ok(s, b"%08d" % i) for i, s in enumerate(conns))
    print(f"READY {first}", flush=True)
    sys.stdin.readline()
    refused = accepted = 0
    extra = []
    for _ in range(args.extra):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect((args.connect, args.port))
            if echo_ok(s, b"extra"):
                accepted += 1
            else:
                refused += 1
            extra.append(s)
        except OSError:
            refused += 1
            s.close()
    still = sum(echo_ok(s, b"%08d" % (i + 7)) for i, s in enumerate(conns))
    print(json.dumps({"count": args.count, "first_ok": first, "extra_accepted": accepted,
                      "extra_refused": refused, "still_ok": still}), flush=True)
    for s in conns + extra:
        s.close()
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="role", required=True)
    sp = sub.add_parser("server")
    sp.add_argument("--bind", required=True)
    sp.add_argument("--port", type=int, required=True)
    cp = sub.add_parser("client")
    cp.add_argument("--connect", required=True)
    cp.add_argument("--port", type=int, required=True)
    cp.add_argument("--count", type=int, required=True)
    cp.add_argument("--extra", type=int, default=0)
    args = p.parse_args()
    return server(args) if args.role == "server" else client(args)


if __name__ == "__main__":
    sys.exit(main())
