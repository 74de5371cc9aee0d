"""Suite-wide: byte-compiled sources, and every program the tests run recorded and
checked last.

- An editable install runs the sources in this tree; with PYTHONDONTWRITEBYTECODE
  set (as in many CI and agent environments), or as an unprivileged test user who
  cannot write here, every start of pasta or passt would compile each module
  again: tens of milliseconds that the start-up tests (passt must listen within
  30 ms of exec) cannot spare.  So the packages are compiled once per run.
- See integration/programs.py: whatever a test runs must be installed by
  tools/test.sh, and integration/test_programs_installed.py checks that once
  every other test has run.
"""

from __future__ import annotations

import compileall
from pathlib import Path

from integration import programs

ROOT = Path(__file__).resolve().parent
PACKAGES = ("common", "pasta", "passt", "pesto")

LAST = "test_programs_installed.py::"


def pytest_configure(config) -> None:
    for package in PACKAGES:
        if (ROOT / package).is_dir():
            compileall.compile_dir(ROOT / package, quiet=2)
    programs.install()


def pytest_collection_modifyitems(session, config, items) -> None:
    items.sort(key=lambda item: LAST in item.nodeid)      # stable: all others keep order
