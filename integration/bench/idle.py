#!/usr/bin/env python3
"""Idle cost, ours vs C pasta vs slirp4netns: wake-ups per second and RSS with
0, 200 and 1000 idle TCP connections open through the tool.

Hundreds of containers on a laptop each run one of these, so what an idle one
costs matters: every wake-up is a context switch that keeps a core out of its
sleep states.  For each tool and each connection count, a fresh namespace
(podman's pattern: `--netns PATH`, pasta's default forwarding, so its
once-a-second `auto` port scan runs) gets the tool attached; a client in the
namespace opens the connections to a server beyond the "host" (the router
namespace of the test world, reached through the tool's tap), they exchange
one byte each way, and then nothing moves.  After SETTLE seconds, the
voluntary context switches of all the tool's threads (/proc/PID/task/*/status:
each sleep ends in one) are counted over SECONDS: wake-ups per second;
involuntary ones (preemptions, which other load adds) are reported apart.  RSS
is read at the end.  Target (issue 14): at most 2 wake-ups/s at every count, and
pasta's idle RSS (0 connections) <= 30 MiB.

    integration/bench/idle.py [--seconds 20] [--counts 0,200,1000] [--json FILE]
                              [--impls ours,pasta-c,slirp4netns] [--ours PATH]

Take the figures on a quiet machine: on a loaded one, say so (the load
average is printed and recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from integration.conftest import our_command  # noqa: E402
from integration.test_passt_guest import REMOTE4, host_world  # noqa: E402

TARGET_WAKEUPS = 2.0
TARGET_RSS_MIB = 30.0
PORT = 5099

SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(4096)
print("ready", flush=True)
held = []
while True:
    c, _ = s.accept()
    c.recv(1)
    c.send(b"y")
    held.append(c)
"""

CLIENT = r"""
import resource, socket, sys
n = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 64, n + 64))
held = []
for _ in range(n):
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    c.send(b"x")
    assert c.recv(1) == b"y"
    held.append(c)
print("open", len(held), flush=True)
sys.stdin.read()
"""


def switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of all the threads of `pid`.  Each
    sleep ends in one voluntary switch: those are the wake-ups; involuntary ones are
    preemptions, which other load on the machine adds."""
    vol = invol = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    vol += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    invol += int(line.split()[1])
        except (OSError, ValueError):
            pass                        # a thread that ended meanwhile
    return vol, invol


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Attached:
    """One tool attached to a fresh namespace, podman-style; `pid` is the tool's."""

    def __init__(self, impl: str, cmd: list[str], prefix: list[str], work: Path,
                 name: str) -> None:
        self.impl, self.name, self.work = impl, name, work
        self.proc: subprocess.Popen | None = None
        subprocess.run(["ip", "netns", "add", name], check=True)
        path = f"/run/netns/{name}"
        if impl == "slirp4netns":
            self.proc = subprocess.Popen(
                [*prefix, *cmd, "--configure", "--mtu=65520", "--netns-type=path", path,
                 "tap0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.pid = self.proc.pid
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                routes = subprocess.run(["ip", "-n", name, "route"], capture_output=True,
                                        text=True).stdout
                if "default" in routes:
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError("slirp4netns did not configure the namespace")
        else:
            pid_file = work / f"{name}.pid"
            subprocess.run([*prefix, *cmd, "--config-net", "--quiet", "--runas", "0", "-P",
                            str(pid_file), "--netns", path], check=True, timeout=30)
            self.pid = int(pid_file.read_text())

    def close(self) -> None:
        try:
            os.kill(self.pid, 15)
        except ProcessLookupError:
            pass
        if self.proc is not None:
            self.proc.wait(timeout=10)
        else:
            deadline = time.monotonic() + 5
            while Path(f"/proc/{self.pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        (self.work / f"{self.name}.pid").unlink(missing_ok=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def measure(impl: str, cmd: list[str], count: int, up, work: Path, seconds: float,
            settle: float) -> dict:
    name = f"pidle-{os.getpid()}-{impl}-{count}"
    tool = Attached(impl, cmd, up.exec_prefix(), work, name)
    client = None
    try:
        client = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-c", CLIENT,
                                   REMOTE4, str(PORT), str(count)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = client.stdout.readline().strip()
        if line != f"open {count}":
            raise RuntimeError(f"{impl}: client opened no connections ({line!r})")
        time.sleep(settle)
        before, t0 = switches(tool.pid), time.monotonic()
        time.sleep(seconds)
        after, t1 = switches(tool.pid), time.monotonic()
        return {"wakeups_per_s": round((after[0] - before[0]) / (t1 - t0), 2),
                "preemptions_per_s": round((after[1] - before[1]) / (t1 - t0), 2),
                "rss_mib": round(rss_mib(tool.pid), 1)}
    finally:
        if client is not None:
            client.stdin.close()
            client.wait(timeout=10)
        tool.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--settle", type=float, default=3.0)
    p.add_argument("--counts", default="0,200,1000")
    p.add_argument("--impls", default="ours,pasta-c,slirp4netns")
    p.add_argument("--ours", help="our pasta (default: $PASST_PY_PREFIX/bin/pasta)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if os.geteuid() != 0:
        return print("idle: needs root (namespaces)", file=sys.stderr) or 1
    cmds = {"ours": [a.ours] if a.ours else our_command("pasta"),
            "pasta-c": ["/usr/bin/pasta"], "slirp4netns": ["/usr/bin/slirp4netns"]}
    impls = [i for i in a.impls.split(",") if i]
    counts = [int(c) for c in a.counts.split(",")]
    load = os.getloadavg()
    res: dict = {"load_before": load, "seconds": a.seconds, "results": {}}
    with host_world() as up:
        server = subprocess.Popen(["ip", "netns", "exec", up.router_ns, sys.executable, "-c",
                                   SERVER, REMOTE4, str(PORT)], stdout=subprocess.PIPE,
                                  text=True)
        work = Path(f"/tmp/pidle-{os.getpid()}")
        work.mkdir(mode=0o700)
        try:
            assert server.stdout.readline().strip() == "ready"
            for count in counts:                # tools interleaved at each count
                for impl in impls:
                    res["results"].setdefault(impl, {})[str(count)] = measure(
                        impl, cmds[impl], count, up, work, a.seconds, a.settle)
        finally:
            server.kill()
            server.wait()
            for f in work.iterdir():
                f.unlink()
            work.rmdir()
    res["load_after"] = os.getloadavg()
    print(f"idle cost over {a.seconds:.0f} s (load average {load[0]:.2f} before, "
          f"{res['load_after'][0]:.2f} after)")
    print(f"{'connections':>11} {'impl':12} {'wake-ups/s':>10} {'preempt/s':>9} "
          f"{'RSS MiB':>8}  verdict (<= {TARGET_WAKEUPS:g}/s)")
    for count in counts:
        for impl in impls:
            r = res["results"][impl][str(count)]
            verdict = ("met" if r["wakeups_per_s"] <= TARGET_WAKEUPS else "MISSED") \
                if impl == "ours" else ""
            print(f"{count:>11} {impl:12} {r['wakeups_per_s']:>10.1f} "
                  f"{r['preemptions_per_s']:>9.1f} {r['rss_mib']:>8.1f}  {verdict}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
