"""Run a function in a short-lived child process and bring its result back.

Heavy libraries (pyroute2 costs about 25 MiB and 0.25 s to import) are used
only inside such a child, so their cost never stays resident in the
long-running process.  The child's result travels back as JSON over a pipe;
an exception in the child comes back as `HelperError` with its message.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any


class HelperError(Exception):
    """The function raised in the child; the message is the child's."""


def run_in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """Call fn(*args) in a forked child and return its JSON-able result."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(rfd)
        # pyroute2 logs every netlink message at debug level: not ours to show
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
        code = 0
        try:
            try:
                payload = {"ok": fn(*args)}
            except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
                payload = {"error": str(exc) or type(exc).__name__,
                           "trace": traceback.format_exc()}
                code = 1
            data = json.dumps(payload).encode()
            view = memoryview(data)
            while view:
                view = view[os.write(wfd, view):]
        except BaseException:  # noqa: BLE001
            code = 2
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(wfd)
    chunks = []
    try:
        while True:
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(rfd)
        os.waitpid(pid, 0)
    if not chunks:
        raise HelperError("helper process died without an answer")
    payload = json.loads(b"".join(chunks))
    if "error" in payload:
        err = HelperError(payload["error"])
        err.trace = payload.get("trace", "")  # type: ignore[attr-defined]
        raise err
    return payload["ok"]
