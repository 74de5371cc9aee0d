"""Start-up phases: when each step of set-up ended, for `--debug` and the benchmark.

Start-up time is a figure users feel (podman starts one pasta per container),
so each step marks its end here, and `--debug` prints the list once logging
stands and again at readiness, in milliseconds since our first line of Python
ran (the interpreter's own start, about 10 ms, comes before that):

    startup: 4.1 ms parsed, 5.0 ms helper forked, 61.3 ms host config, ...

Marks cost one `time.monotonic()` call and a list append; nothing is logged
without `--debug`.  This module is imported first thing by the entry points,
so it imports only `time`.
"""

from __future__ import annotations

import time

T0 = time.monotonic()
_marks: list[tuple[str, float]] = []


def mark(name: str) -> None:
    """Step `name` ended now."""
    _marks.append((name, time.monotonic()))


def mark_at(name: str, t: float) -> None:
    """Step `name` ended at monotonic time `t` (in another process: the helper)."""
    _marks.append((name, t))
    _marks.sort(key=lambda m: m[1])


def marks() -> list[tuple[str, float]]:
    """(step, milliseconds since T0), in the order they ended."""
    return [(name, (t - T0) * 1000.0) for name, t in _marks]


def summary() -> str:
    return ", ".join(f"{ms:.1f} ms {name}" for name, ms in marks())
