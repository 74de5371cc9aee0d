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
