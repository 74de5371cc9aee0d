"""common.helper: calls run in the forked child, answers come back in order,
prefetched calls are answered from what the child already sent, and pyroute2
is loaded without its package __init__ (which pulls in asyncio and the rest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.helper import Helper, HelperError

ROOT = Path(__file__).resolve().parent.parent


def whoami(tag: str) -> list:
    return [tag, os.getpid()]


def fails() -> None:
    raise ValueError("no such thing")


def loaded(prefix: str) -> list[str]:
    return sorted(m for m in sys.modules if m == prefix or m.startswith(prefix + "."))


def test_call_runs_in_the_child_and_errors_come_back():
    helper = Helper()
    try:
        tag, pid = helper.call(whoami, "a")
        assert tag == "a" and pid == helper.pid != os.getpid()
        with pytest.raises(HelperError, match="no such thing"):
            helper.call(fails)
        assert helper.call(whoami, "after")[0] == "after"     # still serving
    finally:
        helper.close()


def test_prefetched_answers_keep_their_order():
    helper = Helper()
    try:
        helper.prefetch(whoami, "early")
        ticket = helper.submit(whoami, "second")
        assert helper.call(whoami, "third")[0] == "third"     # not prefetched: its own
        assert helper.call(whoami, "early")[0] == "early"     # the prefetched answer
        assert helper.result(ticket)[0] == "second"
        assert not helper._prefetched and not helper._replies
    finally:
        helper.close()


CHILD_MODULES = """
import json, sys
from common.helper import Helper
import test_helper
helper = Helper(preload=("common.rtnl",), bypass_init=("pyroute2",))
print(json.dumps({p: helper.call(test_helper.loaded, p)
                  for p in ("pyroute2.netlink.rtnl.ifinfmsg", "asyncio", "pyroute2.ndb")}))
helper.close()
"""


def test_pyroute2_messages_load_without_the_package_init():
    # a fresh interpreter: the helper is forked, so it inherits what this one loaded
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    out = subprocess.run([sys.executable, "-c", CHILD_MODULES], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=60, check=True).stdout
    loaded_in_child = json.loads(out)
    assert loaded_in_child["pyroute2.netlink.rtnl.ifinfmsg"]
    assert loaded_in_child["asyncio"] == []
    assert loaded_in_child["pyroute2.ndb"] == []
