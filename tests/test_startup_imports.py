"""What pasta and passt import before the netlink helper is forked stays small.

Everything imported before the fork (common.options.program_main: parsing,
the sandbox's first step, the helper itself) delays the helper's start and so
the whole start-up, since the helper loads pyroute2 on the other core while
we import the rest.  Importing common.sandbox there cost 25-50 ms
(ctypes, seccomp, ...); pyroute2 in the main process, 85-150 ms."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BEFORE_FORK = """
import json, sys
import common.phases, common.options, common.sandbox_start, common.helper
print(json.dumps(sorted(sys.modules)))
"""

HEAVY = ("common.sandbox", "common.seccomp", "common.conf", "ctypes", "pyroute2", "numpy",
         "dataclasses", "typing", "logging", "asyncio")


def test_nothing_heavy_before_the_helper_is_forked():
    out = subprocess.run([sys.executable, "-c", BEFORE_FORK], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, check=True).stdout
    loaded = set(json.loads(out))
    assert not [m for m in HEAVY if m in loaded]


# what pasta's main process imports on its way to a configured namespace for a command
# (pasta.cli.run and start_up); the netlink helper's modules are its own time
PASTA_SETUP = """
import json, sys
import common.phases, common.options, common.sandbox_start, common.helper
import common.conf, common.report, common.process, common.log
import pasta.session, pasta.ns, pasta.cli
print(json.dumps(sorted(sys.modules)))
"""

# each costs 1-35 ms and is not needed there: dataclasses (and inspect) compile every
# method of every class (common.record instead), hashlib loads OpenSSL for a BLAKE2s the
# builtin _blake2 has, inotify_simple pulls in ctypes.util and subprocess for a watch only
# --netns PATH needs, logging.handlers only serves a daemon's syslog, typing only the type
# checker, platform for what os.uname() says
NOT_FOR_A_COMMAND = ("dataclasses", "inspect", "hashlib", "_hashlib", "inotify_simple",
                     "ctypes.util", "subprocess", "logging.handlers", "pyroute2", "typing",
                     "platform")


def test_pasta_sets_up_without_what_it_does_not_use():
    out = subprocess.run([sys.executable, "-c", PASTA_SETUP], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, check=True).stdout
    loaded = set(json.loads(out))
    assert [m for m in NOT_FOR_A_COMMAND if m in loaded] == []
