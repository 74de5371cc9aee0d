"""Count the system calls made after the seccomp filter, from `strace -ff -tt` files.

    python tools/syscall_census.py TRACE_DIR

TRACE_DIR holds PROG.RUN.TID files (tools/syscall-census.sh makes them).  For
each run, the thread that called seccomp(SECCOMP_SET_MODE_FILTER) and the
threads it had created are the sandboxed process; their calls after that
moment are counted per program and set against common/syscalls.py.
"""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import syscalls  # noqa: E402

CALL = re.compile(r"^(\d\d):(\d\d):(\d\d\.\d+) (\w+)\(")
THREAD = re.compile(r"^\S+ clone3?\(.*CLONE_THREAD.*\) = (\d+)")
SECCOMP = re.compile(r"^(\S+) seccomp\(SECCOMP_SET_MODE_FILTER")
KILLED = "+++ killed by SIGSYS"


def seconds(h: str, m: str, s: str) -> float:
    return int(h) * 3600 + int(m) * 60 + float(s)


def census(trace_dir: Path) -> tuple[dict[str, Counter], dict[str, Counter]]:
    runs: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(dict)
    for f in trace_dir.iterdir():
        prog, run, tid = f.name.split(".")
        runs[(prog, run)][tid] = f.read_text(errors="replace").splitlines()
    counts: dict[str, Counter] = defaultdict(Counter)
    killers: dict[str, Counter] = defaultdict(Counter)
    for (prog, _run), files in runs.items():
        for tid, lines in files.items():
            marks = [m.group(1) for m in map(SECCOMP.match, lines) if m]
            if not marks:
                continue
            h, m, s = marks[-1].split(":")
            start = seconds(h, m, s)
            threads = {tid} | {t.group(1) for t in map(THREAD.match, lines) if t}
            for t in threads:
                last = None
                for line in files.get(t, []):
                    c = CALL.match(line)
                    if c and seconds(*c.groups()[:3]) > start:
                        counts[prog][c.group(4)] += 1
                        last = c.group(4)
                    elif KILLED in line and last:
                        killers[prog][last] += 1
    return counts, killers


def main() -> None:
    counts, killers = census(Path(sys.argv[1]))
    for prog in sorted(counts):
        allowed = {r.name for r in syscalls.allowed(prog)} if prog in ("pasta", "passt") \
            else set()
        print(f"== {prog}: calls after the filter, by count")
        for name, n in counts[prog].most_common():
            mark = "" if name in allowed else "   <-- NOT ALLOWED"
            print(f"{n:12d}  {name}{mark}")
        unused = sorted(allowed - set(counts[prog]))
        print(f"allowed but not seen: {' '.join(unused) or '-'}")
        if killers[prog]:
            print(f"killed by SIGSYS after: {dict(killers[prog])}")


if __name__ == "__main__":
    main()
