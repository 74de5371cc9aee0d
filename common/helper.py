"""A helper process for heavy, short-lived work, so its cost never stays in ours.

pyroute2 costs about 25 MiB and a tenth of a second or more to import.  It is
needed twice, briefly: to look at the host's links and routes, and to
configure the namespace's.  So a child is forked first thing (`Helper`),
imports the library while we parse the command line, and then runs the
calls we send it: a module-level function by name, with JSON-able
arguments and, optionally, file descriptors passed over the socket (a
namespace to enter, say).  Results come back as JSON; an exception in the
child comes back as `HelperError` with the child's message.  When we close
the helper it exits, taking the library's memory with it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import socket
import traceback
from collections.abc import Callable, Sequence
from typing import Any

MAX_MESSAGE = 1 << 20
MAX_FDS = 4


class HelperError(Exception):
    """The function raised in the helper; the message is the helper's."""


class Helper:
    def __init__(self, preload: str | None = None) -> None:
        """Fork the helper; it imports module `preload` straight away."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            ours.close()
            _serve(theirs, preload)          # never returns
        theirs.close()
        self.sock: socket.socket | None = ours
        self.pid = pid

    def call(self, fn: Callable[..., Any], *args: Any, fds: Sequence[int] = ()) -> Any:
        """fn(*args, *received_fds) in the helper; its JSON-able result."""
        if self.sock is None:
            raise HelperError("helper already closed")
        request = json.dumps([fn.__module__, fn.__qualname__, list(args)]).encode()
        try:
            socket.send_fds(self.sock, [request], list(fds))
            reply = self.sock.recv(MAX_MESSAGE)
        except OSError as exc:
            raise HelperError(f"helper process: {exc.strerror}") from None
        if not reply:
            raise HelperError("helper process died without an answer")
        payload = json.loads(reply)
        if "error" in payload:
            err = HelperError(payload["error"])
            err.trace = payload.get("trace", "")  # type: ignore[attr-defined]
            raise err
        return payload["ok"]

    def close(self) -> None:
        """The helper exits once its socket is closed; reap it if it is our child."""
        if self.sock is None:
            return
        try:
            # shutdown, not just close: a child forked since (a held-back command) still
            # holds a copy of this socket, which would keep the helper waiting
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.sock = None
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass            # we daemonised since: it is our parent's, and init's after that


def _serve(sock: socket.socket, preload: str | None) -> None:
    code = 0
    try:
        # pyroute2 logs every netlink message at debug level: not ours to show
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
        if preload:
            try:
                importlib.import_module(preload)
            except ImportError:
                pass                          # reported by the call that needs it
        while True:
            msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
            if not msg:
                break
            try:
                module, name, args = json.loads(msg)
                fn = importlib.import_module(module)
                for part in name.split("."):
                    fn = getattr(fn, part)
                payload = {"ok": fn(*args, *fds)}
            except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller
                payload = {"error": str(exc) or type(exc).__name__,
                           "trace": traceback.format_exc()}
            finally:
                for fd in fds:
                    os.close(fd)
            sock.send(json.dumps(payload).encode())
    except BaseException:  # noqa: BLE001
        code = 1
    finally:
        os._exit(code)


def run_in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """Call fn(*args) once in a helper of its own."""
    helper = Helper()
    try:
        return helper.call(fn, *args)
    finally:
        helper.close()
