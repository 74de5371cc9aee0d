"""The sandbox's first step, taken first thing in the process (`common.sandbox`, step 1).

No longer dumpable, every inherited descriptor above 2 closed except
`-F/--fd` and those the caller made, 0-2 populated.  A module of its own
because `common.sandbox` imports ctypes, seccomp and the rest (25-50 ms),
and nothing else may start before this step: the netlink helper is forked
right after it (`common.options.program_main`), so that its work overlaps
ours.  Imports only `os` and python-prctl.
"""

from __future__ import annotations

import os

from common import report

TYPE_CHECKING = False   # typing costs 2 ms at start-up
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

try:
    import prctl  # python-prctl
except ImportError:  # pragma: no cover - a declared dependency
    prctl = None


def fd_from_argv(argv: Sequence[str], options: Iterable[tuple[Sequence[str], bool]]) -> int | None:
    """The -F/--fd value in argv, read the way getopt_long would, or None.

    `options`: (flags, takes_value) for every option of the mode, so that a
    value that merely looks like "-F" is not taken for the option.
    """
    short_value = {f[1] for flags, v in options if v for f in flags if len(f) == 2}
    found: str | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if name == "fd":
                if not eq and i < len(argv):
                    value = argv[i]
                    i += 1
                found = value
            elif not eq and any(f"--{name}" in flags and v for flags, v in options):
                i += 1
            continue
        if arg.startswith("-") and len(arg) > 1:
            for pos, letter in enumerate(arg[1:], 1):
                if letter in short_value:
                    value = arg[pos + 1:]
                    if not value and i < len(argv):
                        value = argv[i]
                        i += 1
                    if letter == "F":
                        found = value
                    break
    if found is not None and found.isdigit():
        return int(found)
    return None


def at_start(keep: Iterable[int] = ()) -> None:
    """Not dumpable; inherited descriptors closed (but 0-2 and `keep`); 0-2 populated."""
    set_dumpable(False)
    close_inherited(keep)
    report.std_fds()


def set_dumpable(on: bool) -> None:
    if prctl is not None:
        prctl.set_dumpable(on)
    else:  # pragma: no cover
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, int(on), 0, 0, 0)  # PR_SET_DUMPABLE


def close_inherited(keep: Iterable[int] = ()) -> None:
    """Close every descriptor from 3 up, except those in `keep`."""
    low = 3
    for fd in sorted(f for f in set(keep) if f >= 3):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)   # close_range(2) underneath: one system call
