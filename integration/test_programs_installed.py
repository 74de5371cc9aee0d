"""Every program this run of the suite started, and every program named in the
tests' sources, is installed on a fresh machine by tools/test.sh (see
integration/programs.py).  The top-level conftest.py runs this test last."""

from __future__ import annotations

from integration import programs


def test_every_program_is_installed_by_test_sh():
    sources = [p for d in ("tests", "integration") for p in (programs.ROOT / d).rglob("*.py")]
    seen = {**programs.literal_programs(sources), **programs.SEEN}
    assert len(seen) > 10, seen            # the sources alone name more than that
    problems = programs.missing(seen, programs.test_sh_packages())
    assert not problems, "\n".join(problems)


def test_a_program_from_an_uninstalled_package_is_reported():
    """The check itself: ping without iputils-ping in the list is caught."""
    wanted = programs.test_sh_packages() - {"iputils-ping"}
    problems = programs.missing({"ping": "a test"}, wanted)
    assert problems and "iputils-ping" in problems[0], problems
    assert programs.missing({"ip": "a test", "sh": "a test"}, wanted) == []

