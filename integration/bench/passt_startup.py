#!/usr/bin/env python3
"""How soon passt listens: from exec to a socket a client can connect to, ours vs C passt.

libvirt 9.0 and scripts start QEMU a few milliseconds after passt without
waiting for it, and QEMU 7.2 connects once (about 50-70 ms after its own
exec here): our target is a listening socket within 30 ms of exec.  Each run
starts `passt -f -q -s PATH` and connects in a tight loop until it succeeds;
runs of ours and C passt alternate, so both see the same load.  Reported:
median, 10th and 90th percentile, min and max, in ms.

Run as root; it makes its own network namespace (so that host discovery sees
a small made-up host, not this machine's) and socket directory, and stops
every passt it starts.
Take the figures on a quiet machine: on a loaded one, say so.

    integration/bench/passt_startup.py [--runs 20] [--ours PATH] [--c PATH] [--json FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLONE_NEWNET = 0x40000000
GIVE_UP = 5.0


def own_netns() -> None:
    """A network namespace of our own with one routed link (a veth pair leading
    nowhere): C passt refuses a host without a routable interface."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    for cmd in (["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
                ["addr", "add", "10.77.0.2/24", "dev", "eth0"],
                ["-6", "addr", "add", "fd77::2/64", "dev", "eth0", "nodad"],
                ["link", "set", "eth0", "up"], ["link", "set", "eth1", "up"],
                ["route", "add", "default", "via", "10.77.0.1"],
                ["-6", "route", "add", "default", "via", "fd77::1"]):
        subprocess.run(["ip", *cmd], check=True)


def time_to_listen(cmd: list[str], path: str) -> float:
    started = time.perf_counter()
    p = subprocess.Popen([*cmd, "-f", "-q", "-s", path], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                try:
                    c.connect(path)
                    return time.perf_counter() - started
                except OSError:
                    pass
            if p.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {p.returncode} before listening")
            if time.perf_counter() - started > GIVE_UP:
                raise RuntimeError(f"{cmd[0]} did not listen within {GIVE_UP} s")
            time.sleep(0.0002)
    finally:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def summary(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples)
    q = statistics.quantiles(ms, n=10) if len(ms) > 1 else ms * 9
    return {"median": statistics.median(ms), "p10": q[0], "p90": q[-1], "min": ms[0],
            "max": ms[-1], "runs": len(ms)}


def main() -> int:
    repo = Path(__file__).resolve().parents[2]
    prefix = Path(os.environ.get("PASST_PY_PREFIX", "/opt/passt-py"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--ours", default=str(prefix / "bin" / "passt"))
    ap.add_argument("--c", default=shutil.which("passt", path="/usr/bin") or "/usr/bin/passt")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (it makes a network namespace)", file=sys.stderr)
        return 2
    own_netns()
    impls = {"ours": [args.ours], "c": [args.c]}
    samples: dict[str, list[float]] = {k: [] for k in impls}
    work = tempfile.mkdtemp(prefix="passt-startup-")
    os.chmod(work, 0o777)            # C passt binds as nobody
    try:
        for i in range(args.runs):
            for name, cmd in impls.items():
                samples[name].append(time_to_listen(cmd, f"{work}/{name}-{i}.socket"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()[0]
    result = {name: summary(s) for name, s in samples.items()}
    result["loadavg_1min"] = load
    print(f"exec to listening socket, ms ({args.runs} runs each; load average {load:.2f}; "
          f"{repo.name})")
    print(f"{'':6} {'median':>8} {'p10':>8} {'p90':>8} {'min':>8} {'max':>8}")
    for name in impls:
        r = result[name]
        print(f"{name:6} {r['median']:8.1f} {r['p10']:8.1f} {r['p90']:8.1f} {r['min']:8.1f} "
              f"{r['max']:8.1f}")
    target = result["ours"]["median"] <= 30.0
    print(f"target (ours, median <= 30 ms): {'met' if target else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
