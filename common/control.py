"""The control socket (`-c PATH`): run-time changes to port forwarding, and the live flows.

Served by the same loop as everything else, on a UNIX stream socket made at
start-up (mode 0600, owned by the user we run as: other users cannot
connect).  `pesto(1)` is its client; `man/pesto.1` documents the protocol,
which is ours (C passt's is a binary one of its own).

Protocol "passt-py-control", version 1: one JSON object per line, UTF-8.

- On connecting, the client gets a hello:
  `{"protocol": "passt-py-control", "version": 1, "mode": "pasta",
  "tables": ["HOST", "SPLICE"]}` (passt has only HOST: -t/-u; SPLICE is
  pasta's -T/-U).
- It sends one request: `{"version": 1, "ops": [OP, ...]}`, each OP one of
  `{"op": "add" | "delete", "option": "-t" | "-u" | "-T" | "-U", "spec": SPEC}`,
  `{"op": "clear", "table": "HOST" | "SPLICE"}`, `{"op": "show"}`,
  `{"op": "flows"}`, `{"op": "policy"}` (show the egress policy) or
  `{"op": "policy", "text": FILE, "source": NAME, "resolved": {HOST: [ADDR, ...]}}`
  (replace it: FILE is a policy file's text, its host names looked up in
  `resolved`, which the client filled in: nothing is resolved here).
- It gets one reply, then the server closes: `{"ok": true, "tables":
  {"HOST": {"tcp": [RULE, ...], "udp": [...]}, ...}}` (rules as
  `[ADDR]%IF:PORTS => [TOADDR/]PORTS`), with `"flows": [FLOW, ...]` when a
  `flows` op was given (FLOW: the fields of the flow log's records) and
  `"policy": {"default": ..., "rules": [{"n": N, "rule": TEXT, "flows": COUNT},
  ...], ...}` when a `policy` op was; or `{"ok": false, "error": "one line"}`.

The ops of a request apply in order to a copy of the tables, then every
listening socket changes at once: if any exact port cannot be bound, nothing
changed (all or nothing per request).  A new policy is parsed whole first and
put in force only if everything else in the request succeeded: a bad rule
leaves the policy as it was, and the error names the file's line.  Deleting a forward closes its
listening sockets only; connections it accepted run on.  A request longer
than REQUEST_MAX, or not sent within TIMEOUT seconds, gets an error reply (if
it can) and the connection is dropped; at most CLIENTS_MAX clients at once.
None of this can disturb the data plane: a request is handled whole in one
loop iteration and a reply is written without blocking.

After set-up (under the sandbox) this needs: accept4, recvfrom, sendto,
close, epoll_ctl, and for added forwards socket, setsockopt, bind, listen
(pasta's -T/-U: through the namespace thread); getsockopt(TCP_INFO) and
getpeername/getsockname for `flows`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
from collections.abc import Callable, Iterable

from common import fwd, sandbox
from common.flowinfo import FlowRecord
from common.gate import Gate
from common.listeners import BindError, PortForwarder
from common.loop import ERR, HUP, IN, OUT, Loop
from common.policy import PolicyError

log = logging.getLogger("control")

PROTOCOL = "passt-py-control"
VERSION = 1
REQUEST_MAX = 64 * 1024
CLIENTS_MAX = 8
TIMEOUT = 5.0
OPS_MAX = 256

TABLES = {"-t": ("HOST", "tcp"), "-u": ("HOST", "udp"),
          "-T": ("SPLICE", "tcp"), "-U": ("SPLICE", "udp")}


class ControlError(Exception):
    """The control socket cannot be made; the message is one line."""


class RequestError(Exception):
    """A request that is refused; the message (one line) goes back to the client."""


class _Client:
    __slots__ = ("sock", "fd", "inbuf", "outbuf", "timer", "closing")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()
        self.outbuf = b""
        self.timer = None
        self.closing = False


class ControlServer:
    def __init__(self, loop: Loop, path: str, *, mode: str,
                 forwarders: dict[str, PortForwarder], families: tuple[int, ...],
                 flows: Callable[[], Iterable[FlowRecord]] | None = None,
                 owner: tuple[int, int] | None = None, timeout: float = TIMEOUT,
                 gate: Gate | None = None) -> None:
        """`forwarders` by option: "-t", "-u" (and "-T", "-U" for pasta); `gate`: the
        egress policy (None: no `policy` op)."""
        self.loop = loop
        self.gate = gate
        self.path = path
        self.mode = mode
        self.forwarders = forwarders
        self.families = families
        self.flows = flows
        self.owner = owner
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.clients: dict[int, _Client] = {}
        self.requests = 0

    # ------------------------------------------------------------ the listening socket

    def open(self) -> None:
        """Bind PATH (replacing a stale socket, never anything else) and listen."""
        path = self.path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise ControlError(f"control socket {path}: {exc.strerror}") from None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise ControlError(f"control socket {path}: exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)                     # nobody behind it: stale
            else:
                raise ControlError(f"control socket {path}: in use")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)                       # born 0600: no window for others
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot bind control socket {path}: {exc.strerror}") from None
        finally:
            os.umask(old)
        try:
            os.chmod(path, 0o600)
            if self.owner is not None and os.getuid() == 0:
                os.chown(path, *self.owner)
            sock.listen(CLIENTS_MAX)
        except OSError as exc:
            sock.close()
            os.unlink(path)
            raise ControlError(f"control socket {path}: {exc.strerror}") from None
        self.sock = sock
        self.loop.add(sock.fileno(), IN, self._accept)

    def give_to(self, owner: tuple[int, int] | None) -> None:
        """Hand the socket file to the user we are about to run as (we are root)."""
        if owner is None or self.sock is None or os.getuid() != 0:
            return
        try:
            os.chown(self.path, *owner)
        except OSError as exc:
            log.warning("cannot hand control socket %s to uid %d: %s", self.path, owner[0],
                        exc.strerror)

    def close(self) -> None:
        for c in list(self.clients.values()):
            self._drop(c)
        if self.sock is not None:
            self.loop.remove(self.sock.fileno())
            self.sock.close()
            self.sock = None
            if sandbox.entered():
                return          # no path leads anywhere in the sandbox: the file stays
            try:
                os.unlink(self.path)
            except OSError:
                pass

    # ------------------------------------------------------------ clients

    def _accept(self, _events: int) -> None:
        assert self.sock is not None
        for _ in range(CLIENTS_MAX * 2):
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("control: accept: %s", exc.strerror)
                return
            conn.setblocking(False)
            c = _Client(conn)
            if len(self.clients) >= CLIENTS_MAX:
                self._reply(c, {"ok": False, "error": "busy: too many control clients"},
                            register=False)
                continue
            self.clients[c.fd] = c
            c.timer = self.loop.call_later(self.timeout, lambda c=c: self._timed_out(c))
            self.loop.add(c.fd, IN, lambda events, c=c: self._event(c, events))
            self._send(c, self._hello())

    def _hello(self) -> dict:
        tables = ["HOST", "SPLICE"] if self.mode == "pasta" else ["HOST"]
        return {"protocol": PROTOCOL, "version": VERSION, "mode": self.mode,
                "tables": tables}

    def _timed_out(self, c: _Client) -> None:
        c.timer = None
        if c.fd in self.clients:
            log.debug("control: client too slow, dropped")
            if not c.closing:
                self._reply(c, {"ok": False, "error": "timed out waiting for a request"})
            else:
                self._drop(c)

    def _event(self, c: _Client, events: int) -> None:
        if events & OUT and c.outbuf:
            self._flush(c)
        if c.closing:
            if events & (ERR | HUP):
                self._drop(c)
            return
        if events & IN:
            try:
                data = c.sock.recv(REQUEST_MAX + 1 - len(c.inbuf))
            except BlockingIOError:
                return
            except OSError:
                self._drop(c)
                return
            if not data:
                self._drop(c)
                return
            c.inbuf += data
            line, nl, _ = bytes(c.inbuf).partition(b"\n")
            if nl:
                self._reply(c, self._handle(line))
            elif len(c.inbuf) > REQUEST_MAX:
                self._reply(c, {"ok": False, "error": f"request longer than {REQUEST_MAX} "
                                                      "bytes"})
        elif events & (ERR | HUP):
            self._drop(c)

    def _reply(self, c: _Client, message: dict, register: bool = True) -> None:
        c.closing = True
        if not register:                          # never joined: try once, then close
            try:
                c.sock.send(json.dumps(message).encode() + b"\n")
            except OSError:
                pass
            c.sock.close()
            return
        self._send(c, message)

    def _send(self, c: _Client, message: dict) -> None:
        c.outbuf += json.dumps(message, separators=(",", ":")).encode() + b"\n"
        self._flush(c)

    def _flush(self, c: _Client) -> None:
        try:
            n = c.sock.send(c.outbuf)
        except BlockingIOError:
            n = 0
        except OSError:
            self._drop(c)
            return
        c.outbuf = c.outbuf[n:]
        if c.outbuf:
            self.loop.modify(c.fd, IN | OUT)
        elif c.closing:
            self._drop(c)
        else:
            self.loop.modify(c.fd, IN)

    def _drop(self, c: _Client) -> None:
        if self.clients.pop(c.fd, None) is None:
            return
        if c.timer is not None:
            c.timer.cancel()
        self.loop.remove(c.fd)
        c.sock.close()

    # ------------------------------------------------------------ requests

    def _handle(self, line: bytes) -> dict:
        self.requests += 1
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return {"ok": False, "error": "malformed request: not JSON"}
        try:
            return self.execute(request)
        except RequestError as exc:
            return {"ok": False, "error": str(exc)}

    def execute(self, request: object) -> dict:
        """Carry out one request (already decoded); RequestError if it is refused."""
        if not isinstance(request, dict):
            raise RequestError("malformed request: not an object")
        if request.get("version") != VERSION:
            raise RequestError(f"unsupported protocol version {request.get('version')!r} "
                               f"(this is version {VERSION})")
        ops = request.get("ops", [])
        if not isinstance(ops, list) or len(ops) > OPS_MAX:
            raise RequestError(f"malformed request: 'ops' must be a list of at most {OPS_MAX}")
        tables = {opt: list(f.rules) for opt, f in self.forwarders.items()}
        want_flows = want_policy = False
        new_policy = None
        for op in ops:
            if not isinstance(op, dict) or not isinstance(op.get("op"), str):
                raise RequestError("malformed request: each op is an object with 'op'")
            kind = op["op"]
            if kind in ("add", "delete"):
                option, spec = op.get("option"), op.get("spec")
                if option not in self.forwarders or not isinstance(spec, str):
                    raise RequestError(f"{kind}: no table for option {option!r} here"
                                       if isinstance(spec, str) else
                                       f"{kind}: 'spec' must be a string")
                tables[option] = self._change(kind, option, spec, tables[option])
            elif kind == "clear":
                name = op.get("table")
                options = [o for o, (t, _) in TABLES.items()
                           if t == name and o in self.forwarders]
                if not options:
                    raise RequestError(f"clear: no table {name!r} here")
                for option in options:
                    tables[option] = []
            elif kind == "show":
                pass
            elif kind == "flows":
                want_flows = True
            elif kind == "policy":
                want_policy = True
                if "text" in op:
                    new_policy = self._parse_policy(op)
            else:
                raise RequestError(f"unknown op {kind!r}")
        self._apply(tables)
        if new_policy is not None:
            assert self.gate is not None
            self.gate.install(*new_policy)
        reply: dict = {"ok": True, "tables": self.tables()}
        if want_flows:
            reply["flows"] = [r.as_dict() for r in self.flows()] if self.flows else []
        if want_policy:
            reply["policy"] = self.gate.describe() if self.gate is not None else None
        return reply

    def _parse_policy(self, op: dict) -> tuple:
        if self.gate is None:
            raise RequestError("policy: no egress policy here")
        text, source = op.get("text"), op.get("source", "policy")
        resolved = op.get("resolved", {})
        if not isinstance(text, str) or not isinstance(source, str) or not isinstance(
                resolved, dict) or not all(isinstance(v, list) and all(
                    isinstance(a, str) for a in v) for v in resolved.values()):
            raise RequestError("policy: 'text' and 'source' are strings, 'resolved' maps "
                               "names to lists of addresses")
        try:
            return self.gate.parse(text, fwd.show(source, 200), resolved)
        except PolicyError as exc:
            raise RequestError(str(exc)) from None

    def _change(self, kind: str, option: str, spec: str, table: list) -> list:
        try:
            rules = fwd.parse_rules(spec, mode=self.mode, families=self.families,
                                    ns_side=option in ("-T", "-U"))
            if kind == "add":
                return fwd.add_rules(table, rules)
            return fwd.delete_rules(table, rules)
        except ValueError as exc:              # SpecError is one
            raise RequestError(f"{option} {fwd.show(spec)}: {exc}") from None

    def _apply(self, tables: dict[str, list]) -> None:
        """Every forwarder to its new table, or none of them."""
        pending = []
        try:
            for option, rules in tables.items():
                f = self.forwarders[option]
                if list(f.rules) != rules:
                    pending.append(f.prepare(rules))
        except BindError as exc:
            for p in pending:
                p.abort()
            raise RequestError(str(exc)) from None
        for p in pending:
            p.commit()
        if pending:
            log.info("control: forwarding changed: %s", "; ".join(
                f"{o} {f.describe_bound() or 'nothing'}" for o, f in self.forwarders.items()))

    def tables(self) -> dict:
        out: dict[str, dict[str, list[str]]] = {}
        for option, f in self.forwarders.items():
            table, proto = TABLES[option]
            out.setdefault(table, {})[proto] = [str(r) for r in f.rules]
        return out


def open_control(loop: Loop, path: str | None, *, mode: str, forwarders: dict,
                 services, families: tuple[int, ...],
                 flows: Callable[[], Iterable[FlowRecord]] | None,
                 gate: Gate | None = None) -> ControlServer | None:
    """The control socket for `-c PATH`, listening; None without -c.  Only the tables of
    protocols in use can be changed."""
    if not path:
        return None
    usable = {o: f for o, f in forwarders.items()
              if f is not None and getattr(services, TABLES[o][1], True)}
    server = ControlServer(loop, path, mode=mode, forwarders=usable, families=families,
                           flows=flows, gate=gate)
    server.open()
    return server
