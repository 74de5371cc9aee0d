#!/usr/bin/env python3
"""pasta's start-up, ours vs C pasta: wall time of the two ways pasta is started.

- `command`: `pasta --config-net -- true` as an unprivileged user (a new user
  and network namespace, configured, the command run, pasta gone): exec to exit.
- `podman`: podman's pattern: as root (`--runas 0`, as the peer benchmark and
  rootless podman's uid 0 in its namespace), `pasta --config-net -t none -u none
  -T none -U none --quiet -P FILE --netns PATH` on a fresh namespace file,
  daemonising: exec to the parent's exit, which means "configured".  The
  daemon is then stopped by the PID in FILE.

Both run inside a throwaway "host" namespace (a routed link and a
resolv.conf of its own: `ip netns exec`), so host discovery sees a small
made-up host.  The launcher's own cost (`ip netns exec` + `setpriv`, the same
for both implementations) is measured with `true` and subtracted.  Runs of
ours and C pasta alternate, so that both see the same load.  Our phases come
from extra runs with `-d` (the `start-up:` line: milliseconds since our
first line of Python ran, each phase's end), medians per phase.

Our modules are byte-compiled first, as an installed system has them (this
development environment sets PYTHONDONTWRITEBYTECODE=1, so nothing would
compile them otherwise).  Target: a median <= 150 ms for both cases.

    integration/bench/startup.py [--runs 15] [--ours PATH] [--c PATH] [--json FILE]
                                 [--importtime]

Take the figures on a quiet machine: on a loaded one, say so (the load
average is printed and recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from integration.conftest import TEST_USER, our_command, rootless_user  # noqa: E402
from integration.test_passt_guest import host_world  # noqa: E402

TARGET_MS = 150.0
PODMAN_ARGS = ["--config-net", "-t", "none", "-u", "none", "-T", "none", "-U", "none", "--quiet"]


def compile_ours(ours: list[str]) -> str:
    """Byte-compile our packages with the interpreter that runs them; say where."""
    python = Path(ours[0]).parent / "python3" if Path(ours[0]).name != "python3" else ours[0]
    if not Path(python).exists():
        python = Path(sys.executable)
    where = subprocess.run([str(python), "-c", "import common, pasta, passt, os; print('\\n'"
                            ".join(os.path.dirname(m.__file__) for m in (common, pasta, passt)))"],
                           capture_output=True, text=True, check=True).stdout.split()
    subprocess.run([str(python), "-m", "compileall", "-q", *where], check=True,
                   stdout=subprocess.DEVNULL)
    return ", ".join(where)


def summary(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"median": round(statistics.median(s), 1), "p10": round(pick(0.1), 1),
            "p90": round(pick(0.9), 1), "min": round(s[0], 1), "max": round(s[-1], 1),
            "n": len(s)}


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, env=env, timeout=30)
    elapsed = (time.perf_counter() - t0) * 1000
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr[-500:]}")
    return elapsed, p.stderr


def phases_of(stderr: str) -> dict[str, float]:
    """The last `start-up:` line (a daemon writes one before its stderr goes away,
    then the whole one to its log)."""
    for line in reversed(stderr.splitlines()):
        if line.startswith("start-up: "):
            out = {}
            for part in line[len("start-up: "):].split(", "):
                ms, _, name = part.partition(" ms ")
                out[name] = float(ms)
            return out
    return {}


class Podman:
    """A fresh namespace file per run, as podman makes one per container."""

    def __init__(self, prefix: list[str], work: Path) -> None:
        self.prefix = prefix
        self.work = work
        self.n = 0

    def run(self, pasta: list[str], extra: list[str] = ()) -> tuple[float, str]:
        self.n += 1
        name = f"pstart-{os.getpid()}-{self.n}"
        pid_file = self.work / f"{name}.pid"
        subprocess.run(["ip", "netns", "add", name], check=True)
        try:
            return timed([*self.prefix, *pasta, *PODMAN_ARGS, *extra, "--runas", "0",
                          "-P", str(pid_file), "--netns", f"/run/netns/{name}"])
        finally:
            stop(pid_file)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def stop(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    pid_file.unlink(missing_ok=True)


def median_phases(runs: list[dict[str, float]]) -> dict[str, float]:
    names: list[str] = []
    for r in runs:
        names += [n for n in r if n not in names]
    return {n: round(statistics.median(r[n] for r in runs if n in r), 1) for n in names}


def importtime(user_prefix: list[str], ours: list[str]) -> list[tuple[str, float]]:
    """Cumulative import time by top-level package in one `command` run (both processes)."""
    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1")
    _, err = timed([*user_prefix, *ours, "-q", "--config-net", "--", "true"], env)
    by_pkg: dict[str, float] = {}
    for line in err.splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            self_us, _cum, name = (x.strip() for x in line[len("import time:"):].split("|"))
            top = name.split(".")[0]
            by_pkg[top] = by_pkg.get(top, 0.0) + int(self_us) / 1000
    return sorted(by_pkg.items(), key=lambda kv: -kv[1])[:15]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--ours", help="our pasta (default: $PASST_PY_PREFIX/bin/pasta)")
    p.add_argument("--c", default="/usr/bin/pasta", help="C pasta")
    p.add_argument("--json", type=Path)
    p.add_argument("--importtime", action="store_true",
                   help="also: import time by package, one run (-X importtime)")
    a = p.parse_args()
    if os.geteuid() != 0:
        return print("startup: needs root (namespaces)", file=sys.stderr) or 1
    ours = [a.ours] if a.ours else our_command("pasta")
    impls = {"ours": ours, "pasta-c": [a.c]}
    compiled = compile_ours(ours)
    load = os.getloadavg()
    res: dict = {"load_before": load, "runs": a.runs, "compiled": compiled, "cases": {}}
    with rootless_user(), host_world() as up:
        work = Path(f"/tmp/pstart-{os.getpid()}")
        work.mkdir(mode=0o700)
        try:
            user_prefix = [*up.exec_prefix(), "setpriv", f"--reuid={TEST_USER}",
                           f"--regid={TEST_USER}", "--clear-groups"]
            root_prefix = up.exec_prefix()
            podman = Podman(root_prefix, work)
            for _ in range(3):                              # warm caches, both
                for cmd in impls.values():
                    timed([*user_prefix, *cmd, "-q", "--config-net", "--", "true"])
                    podman.run(cmd)
            overhead = {"command": summary([timed([*user_prefix, "true"])[0]
                                            for _ in range(a.runs)]),
                        "podman": summary([timed([*root_prefix, "true"])[0]
                                           for _ in range(a.runs)])}
            raw: dict[str, dict[str, list[float]]] = {
                case: {name: [] for name in impls} for case in ("command", "podman")}
            phases: dict[str, list[dict[str, float]]] = {"command": [], "podman": []}
            for _ in range(a.runs):
                for name, cmd in impls.items():
                    raw["command"][name].append(timed(
                        [*user_prefix, *cmd, "-q", "--config-net", "--", "true"])[0])
                    raw["podman"][name].append(podman.run(cmd)[0])
                phases["command"].append(phases_of(timed(
                    [*user_prefix, *ours, "-d", "--config-net", "--", "true"])[1]))
                phases["podman"].append(phases_of(podman.run(ours, ["-d"])[1]))
            for case in ("command", "podman"):
                base = overhead[case]["median"]
                res["cases"][case] = {
                    "launcher_ms": overhead[case],
                    **{name: summary([max(0.0, t - base) for t in ts])
                       for name, ts in raw[case].items()},
                    "phases": median_phases([r for r in phases[case] if r]),
                }
            if a.importtime:
                res["importtime_ms"] = importtime(user_prefix, ours)
        finally:
            for f in work.iterdir():
                f.unlink()
            work.rmdir()
    res["load_after"] = os.getloadavg()
    print(f"pasta start-up, ms (median of {a.runs}, launcher subtracted; load average "
          f"{load[0]:.2f} before, {res['load_after'][0]:.2f} after)")
    print(f"{'case':8} {'impl':8} {'median':>7} {'p10':>7} {'p90':>7}  "
          f"verdict (<= {TARGET_MS:.0f})")
    for case, r in res["cases"].items():
        for name in impls:
            s = r[name]
            verdict = ("met" if s["median"] <= TARGET_MS else "MISSED") if name == "ours" else ""
            print(f"{case:8} {name:8} {s['median']:7.1f} {s['p10']:7.1f} {s['p90']:7.1f}  "
                  f"{verdict}")
        print("  our phases (ms since our first line of Python): "
              + ", ".join(f"{n} {v:.1f}" for n, v in r["phases"].items()))
    if "importtime_ms" in res:
        print("import time by package, one run, both processes (ms): "
              + ", ".join(f"{n} {v:.1f}" for n, v in res["importtime_ms"]))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
