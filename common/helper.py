"""A helper process for heavy, short-lived work, so its cost never stays in ours.

pyroute2 costs about 25 MiB and a tenth of a second or more to import.  It is
needed twice, briefly: to look at the host's links and routes, and to
configure the namespace's.  So a child is forked first thing once the
command line is parsed (`Helper`), before we import anything ourselves: it
loads the library on one core while we load the rest of the program on the
other.  Then it runs the calls we send it: a module-level function by name,
with JSON-able arguments and, optionally, file descriptors passed over the
socket (a namespace to enter, say).  Results come back as JSON; an exception
in the child comes back as `HelperError` with the child's message.  A call
can be sent early (`prefetch`, `submit`) and its answer collected later, so
that the helper works while we do.  When we close the helper it exits,
taking the library's memory with it.

Start-up time is measured (`common.phases`): this module imports only `os`
and `sys` at the top, so that forking costs nothing; what the child or the
calls need is imported where it is used.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False   # typing itself costs 2 ms at start-up
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Sequence
    from typing import Any

MAX_MESSAGE = 1 << 20
MAX_FDS = 4


class HelperError(Exception):
    """The function raised in the helper; the message is the helper's."""


class Helper:
    def __init__(self, preload: Sequence[str] = (), bypass_init: Sequence[str] = ()) -> None:
        """Fork the helper; it imports the modules `preload` straight away.

        A package named in `bypass_init` is entered without running its
        `__init__`: pyroute2's imports every part of the library (0.15 s),
        where the two modules we use cost half of that.
        """
        import _socket  # `socket` costs 3-6 ms more, the child's time

        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            ours.close()
            _serve(theirs.detach(), preload, bypass_init)          # never returns
        theirs.close()
        import socket

        self.sock: socket.socket | None = socket.socket(fileno=ours.detach())
        self.pid = pid
        self._sent = 0                    # requests sent, numbered from 0
        self._received = 0                # replies read (they come in request order)
        self._replies: dict[int, dict] = {}
        self._prefetched: dict[str, int] = {}

    def submit(self, fn: Callable[..., Any], *args: Any, fds: Sequence[int] = ()) -> int:
        """Send fn(*args, *fds) to the helper now; `result(ticket)` collects the answer."""
        import json
        import socket

        if self.sock is None:
            raise HelperError("helper already closed")
        request = json.dumps([fn.__module__, fn.__qualname__, list(args)]).encode()
        try:
            socket.send_fds(self.sock, [request], list(fds))
        except OSError as exc:
            raise HelperError(f"helper process: {exc.strerror}") from None
        self._sent += 1
        return self._sent - 1

    def prefetch(self, fn: Callable[..., Any], *args: Any) -> None:
        """Send fn(*args) now, so that a later `call(fn, *args)` finds its answer ready:
        the helper works on it while we do something else."""
        import json

        key = json.dumps([fn.__module__, fn.__qualname__, list(args)])
        if key not in self._prefetched:
            self._prefetched[key] = self.submit(fn, *args)

    def result(self, ticket: int) -> Any:
        """The answer to request `ticket` (waiting for it); the helper's exception as
        HelperError."""
        import json

        while ticket not in self._replies:
            if self.sock is None:
                raise HelperError("helper already closed")
            try:
                reply = self.sock.recv(MAX_MESSAGE)
            except OSError as exc:
                raise HelperError(f"helper process: {exc.strerror}") from None
            if not reply:
                raise HelperError("helper process died without an answer")
            self._replies[self._received] = json.loads(reply)
            self._received += 1
        payload = self._replies.pop(ticket)
        if "preloaded" in payload:
            from common import phases

            phases.mark_at("helper preloaded", payload["preloaded"])
        if "error" in payload:
            err = HelperError(payload["error"])
            err.trace = payload.get("trace", "")  # type: ignore[attr-defined]
            raise err
        return payload["ok"]

    def call(self, fn: Callable[..., Any], *args: Any, fds: Sequence[int] = ()) -> Any:
        """fn(*args, *received_fds) in the helper; its JSON-able result."""
        if not fds and self._prefetched:
            import json

            ticket = self._prefetched.pop(
                json.dumps([fn.__module__, fn.__qualname__, list(args)]), None)
            if ticket is not None:
                return self.result(ticket)
        return self.result(self.submit(fn, *args, fds=fds))

    def close(self) -> None:
        """The helper exits once its socket is closed; reap it if it is our child."""
        if self.sock is None:
            return
        import socket

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


def _bypass_init(package: str) -> None:
    """Make `package` importable from without running its __init__: a bare package
    module with the right search path, so that its submodules load alone."""
    import importlib.util
    import types

    if package in sys.modules:
        return
    spec = importlib.util.find_spec(package)
    if spec is None or spec.submodule_search_locations is None:
        return                                # not installed: the import will say so
    module = types.ModuleType(package)
    module.__path__ = list(spec.submodule_search_locations)
    module.__spec__ = spec
    module.__file__ = spec.origin
    sys.modules[package] = module


def _serve(fd: int, preload: Sequence[str], bypass_init: Sequence[str]) -> None:
    code = 0
    try:
        import importlib
        import json
        import logging
        import socket
        import time
        import traceback

        sock = socket.socket(fileno=fd)
        # pyroute2 logs every netlink message at debug level: not ours to show
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
        preloaded = None
        if preload:
            try:
                for package in bypass_init:
                    _bypass_init(package)
                for name in preload:
                    importlib.import_module(name)
            except ImportError:
                pass                          # reported by the call that needs it
            preloaded = time.monotonic()
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
            except BaseException as exc:  # everything goes back to the caller
                payload = {"error": str(exc) or type(exc).__name__,
                           "trace": traceback.format_exc()}
            finally:
                for fd in fds:
                    os.close(fd)
            if preloaded is not None:       # once: when the preload ended, for `phases`
                payload["preloaded"] = preloaded
                preloaded = None
            sock.send(json.dumps(payload).encode())
    except BaseException:
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
