"""Suite-wide: record every program the tests run, and check them last.

See integration/programs.py: whatever a test runs must be installed by
tools/test.sh, and integration/test_programs_installed.py checks that once
every other test has run.
"""

from __future__ import annotations

from integration import programs

LAST = "test_programs_installed.py::"


def pytest_configure(config) -> None:
    programs.install()


def pytest_collection_modifyitems(session, config, items) -> None:
    items.sort(key=lambda item: LAST in item.nodeid)      # stable: all others keep order
