#!/usr/bin/env python3
"""passt mode: the same TCP transfers through our passt (stream socket and vhost-user) and C
passt (stream socket), with the same guest.

The QEMU test guest (integration/guest, TCG, one vCPU) gets its address by
DHCP, then moves SIZE bytes to and from a server in the "host" namespace
through the gateway address (which passt maps to the host's loopback),
ROUNDS times each way.  The guest runs `dd` under `nc -e`, so it never
half-closes a connection: the C passt installed here (Debian 12,
0.0~git20230309) stops sending to a guest that half-closed first (no data,
no FIN after the guest's FIN), which busybox `nc` always does on end of input.
The server times each transfer (first accepted byte to end of file); a
sampler reads the passt process's CPU time from /proc/PID/stat every 20 ms,
so each transfer is charged the CPU passt used while it ran.  Reported per
implementation (medians over the rounds): throughput, passt's CPU seconds per
GB moved, and its peak RSS.  "vhost" is our passt with --vhost-user (QEMU's
-netdev vhost-user, the guest's memory a shared memfd): Debian's C passt
predates vhost-user, so it only runs over the stream socket.

The guest is emulated, so the throughput is mostly the guest's: what tells
our implementation apart is the CPU per GB (how much of a core passt needs
to keep up) at the same throughput.

    integration/bench/passt_bench.py [--size MiB] [--rounds N] [--json FILE]
                                     [--only ours|vhost|c]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from integration.conftest import our_command  # noqa: E402
from integration.guest import build_guest, default_cache_dir, run_guest  # noqa: E402
from integration.guest.hostnet import daemon, socket_dir  # noqa: E402
from integration.test_passt_guest import (  # noqa: E402
    GUEST_MEMORY_MB,
    VHOST_DEVICE_OPTS,
    host_world,
    in_ns,
    stream_netdev,
    vhost_netdev,
)

IMPLS = ("ours", "vhost", "c")

UP_PORT, DOWN_PORT = 5101, 5102
LIMIT = 120                       # seconds for one transfer before it counts as stalled
CLK_TCK = os.sysconf("SC_CLK_TCK")

GUEST = r"""
udhcpc -i eth0 -n -q >/dev/null 2>&1 || exit 10
i=0
while [ $i -lt @ROUNDS@ ]; do
    timeout @LIMIT@ nc @GW@ @UP@ -e dd if=/dev/zero bs=64k count=@BLOCKS@ 2>/dev/null
    echo "UP-$i=$?"
    timeout @LIMIT@ nc @GW@ @DOWN@ -e dd of=/dev/null bs=64k 2>/dev/null
    echo "DOWN-$i=$?"
    i=$((i+1))
done
echo BENCH-DONE
"""

# The transfer server, run inside the host namespace: no hashing, zero-copy-ish.
SERVER = r"""
import json, socket, sys, threading, time
size, out = int(sys.argv[1]), sys.argv[2]
lock = threading.Lock()
def note(**e):
    with lock, open(out, "a") as f:
        f.write(json.dumps(e) + "\n")
def sink(c):
    buf = bytearray(1 << 20); n = 0; t0 = None
    while True:
        got = c.recv_into(buf)
        if t0 is None: t0 = time.monotonic()
        if not got: break
        n += got
    note(dir="up", bytes=n, t0=t0, t1=time.monotonic()); c.close()
def source(c):
    data = bytes(1 << 20); left = size; t0 = time.monotonic()
    while left:
        left -= c.send(data[:min(left, len(data))])
    c.shutdown(socket.SHUT_WR)
    while c.recv(65536): pass
    note(dir="down", bytes=size, t0=t0, t1=time.monotonic()); c.close()
def serve(port, fn):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); s.listen(8)
    while True:
        c, _ = s.accept(); threading.Thread(target=fn, args=(c,), daemon=True).start()
for port, fn in ((int(sys.argv[3]), sink), (int(sys.argv[4]), source)):
    threading.Thread(target=serve, args=(port, fn), daemon=True).start()
print("ready", flush=True)
time.sleep(86400)
"""


class CpuSampler(threading.Thread):
    """(monotonic time, CPU seconds, RSS KiB, shared-memory RSS KiB) of one process,
    every `interval` seconds.  The shared part is, for vhost-user, the guest's memory
    that passt touched: QEMU's pages, counted in the RSS of every process mapping them."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float, int, int]] = []
        self.running = True

    def run(self) -> None:
        stat, status = f"/proc/{self.pid}/stat", f"/proc/{self.pid}/status"
        while self.running:
            try:
                with open(stat) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(status) as f:
                    kib = {line.split(":")[0]: int(line.split()[1]) for line in f
                           if line.startswith(("VmRSS:", "RssShmem:"))}
                rss, shared = kib["VmRSS"], kib["RssShmem"]
            except (OSError, KeyError):
                return
            cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
            self.samples.append((time.monotonic(), cpu, rss, shared))
            time.sleep(self.interval)

    def cpu_between(self, t0: float, t1: float) -> float:
        def at(t: float) -> float:
            before = [s for s in self.samples if s[0] <= t]
            after = [s for s in self.samples if s[0] >= t]
            if not before:
                return after[0][1] if after else 0.0
            if not after:
                return before[-1][1]
            (ta, ca, *_), (tb, cb, *_) = before[-1], after[0]
            return ca if tb == ta else ca + (cb - ca) * (t - ta) / (tb - ta)
        return at(t1) - at(t0)

    def peak_rss(self) -> int:
        return max((s[2] for s in self.samples), default=0)

    def peak_own_rss(self) -> int:
        """Peak RSS without shared memory (for vhost-user: without the guest's pages)."""
        return max((s[2] - s[3] for s in self.samples), default=0)


def passt_pid(launcher: subprocess.Popen) -> int:
    """`ip netns exec` execs passt in place: the launcher's PID is passt's."""
    return launcher.pid


def run_one(impl: str, image, size: int, rounds: int, work: Path) -> dict:
    results = work / f"{impl}.jsonl"
    cmd_passt = ["passt"] if impl == "c" else our_command("passt")
    if impl == "vhost":
        cmd_passt.append("--vhost-user")
        netdev_kw = {"memory_mb": GUEST_MEMORY_MB, "device_opts": VHOST_DEVICE_OPTS}
    else:
        netdev_kw = {}
    with host_world() as up, socket_dir() as sdir:
        server = subprocess.Popen(in_ns(up.host_ns, sys.executable, "-c", SERVER, str(size),
                                        str(results), str(UP_PORT), str(DOWN_PORT)),
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "ready"
            sock = sdir / "passt.socket"
            cmd = [*up.exec_prefix(), *cmd_passt, "-f", "-q", "--one-off", "-s", str(sock)]
            with daemon(cmd, work / f"{impl}.passt.log", ready=sock) as proc:
                sampler = CpuSampler(passt_pid(proc))
                sampler.start()
                script = (GUEST.replace("@ROUNDS@", str(rounds))
                          .replace("@BLOCKS@", str(size // 65536)).replace("@GW@", up.gw4)
                          .replace("@UP@", str(UP_PORT)).replace("@DOWN@", str(DOWN_PORT))
                          .replace("@LIMIT@", str(LIMIT)))
                netdev = vhost_netdev(sock) if impl == "vhost" else stream_netdev(sock)
                result = run_guest(image, netdev, script, 60 + 2 * rounds * (LIMIT + 5),
                                   **netdev_kw)
                sampler.running = False
                sampler.join()
        finally:
            server.kill()
            server.wait()
            server.stdout.close()
    if result.exit_code != 0 or "BENCH-DONE" not in result.console:
        log = (work / f"{impl}.passt.log").read_text(errors="replace")
        raise SystemExit(f"{impl}: guest failed (exit {result.exit_code}, "
                         f"{result.elapsed:.0f} s):\n{result.console[-3000:]}\n"
                         f"--- passt ---\n{log[-2000:]}")
    entries = [json.loads(line) for line in results.read_text().splitlines()]
    out: dict = {"impl": impl, "size": size, "rounds": rounds,
                 "peak_rss_mib": round(sampler.peak_rss() / 1024, 1),
                 "peak_own_rss_mib": round(sampler.peak_own_rss() / 1024, 1)}
    for direction in ("up", "down"):
        rows = [e for e in entries if e["dir"] == direction and e["bytes"] == size]
        mbps = [e["bytes"] * 8 / (e["t1"] - e["t0"]) / 1e6 for e in rows]
        cpu_per_gb = [sampler.cpu_between(e["t0"], e["t1"]) / (e["bytes"] / 1e9) for e in rows]
        out[direction] = {"mbit_s": round(statistics.median(mbps), 1) if mbps else None,
                          "cpu_s_per_gb": (round(statistics.median(cpu_per_gb), 2)
                                           if cpu_per_gb else None),
                          "n": len(rows)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256, help="MiB per transfer (default 256)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--only", choices=IMPLS)
    a = p.parse_args()
    if os.geteuid() != 0:
        return print("passt_bench: needs root (network namespaces)", file=sys.stderr) or 1
    image = build_guest(default_cache_dir())
    size = a.size << 20
    rows = []
    with tempfile.TemporaryDirectory(prefix="passt-bench-") as work:
        for impl in IMPLS:
            if a.only and a.only != impl:
                continue
            rows.append(run_one(impl, image, size, a.rounds, Path(work)))
    print(f"passt mode: guest (TCG, 1 vCPU) <-> host loopback through the gateway, "
          f"{a.size} MiB x {a.rounds} each way, medians")
    print(f"{'impl':6} {'direction':12} {'Mbit/s':>9} {'CPU s/GB':>9} {'peak RSS MiB':>13} "
          f"{'without shared':>15}")
    for r in rows:
        for direction, label in (("up", "guest->host"), ("down", "host->guest")):
            d = r[direction]
            print(f"{r['impl']:6} {label:12} {d['mbit_s'] or '-':>9} "
                  f"{d['cpu_s_per_gb'] or '-':>9} {r['peak_rss_mib']:>13} "
                  f"{r['peak_own_rss_mib']:>15}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
