#!/usr/bin/env python3
"""What the egress policy and the flow log cost: our pasta plain, with a 100-rule policy,
and with the flow log, on TCP connections per second and request/response latency.

The measuring is the shared peer benchmark's (`peers.py`, as for run.py): the
three variants are three "implementations" of it, run interleaved in rounds,
medians taken.  The policy has 99 deny rules (networks and port lists that
the benchmark's traffic never matches) then `allow tcp:*`, default deny: every
new connection is decided by rule 100.  The flow log goes to a file in the
output directory (two records per connection).  Target: each costs under 5 %
of connections/s and of RR p50.

    integration/bench/policy_bench.py [--quick] [--rounds N] [--peers PATH] [--pasta PATH]
                                      [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import find_peers, fmt, metric, our_pasta  # noqa: E402

VARIANTS = ("plain", "rules100", "flowlog")
TARGET = 0.05


def policy_file(path: Path) -> Path:
    lines = ["# 99 rules the benchmark's traffic never matches, then the one it does"]
    for i in range(99):
        if i % 3 == 0:
            lines.append(f"deny tcp:10.{i}.0.0/16:{1000 + i},{2000 + i}-{2100 + i}")
        elif i % 3 == 1:
            lines.append(f"deny udp:[fd{i:02x}::]/16:53")
        else:
            lines.append(f"deny 198.18.{i}.0/24")
    lines += ["allow tcp:*", "default deny"]
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", help="path of peers.py (default: ../shared/bench/peers.py)")
    p.add_argument("--pasta", help="our pasta executable (default: $PASST_PY_PREFIX/bin/pasta)")
    p.add_argument("--quick", action="store_true", help="short runs (peers.py --quick)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (peers.py)")
    p.add_argument("--out", help="directory for the JSON, the flow log and the report")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root (namespaces, tap devices)")
    peers, pasta = find_peers(args.peers), our_pasta(args.pasta)
    out = Path(args.out or tempfile.mkdtemp(prefix="passt-py-policy-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    rules = policy_file(out / "rules100.policy")
    flows = out / "flows.jsonl"
    cmd = [sys.executable, peers, "--no-baseline", "--out-dir", str(out),
           "--json", str(out / "peers.json"), "--rounds", str(args.rounds),
           "--tests", "rr_out,crr_out"]
    for v in VARIANTS:
        cmd += ["--impl", f"{v}=pasta:{pasta}"]
    cmd += ["--extra-args", f"rules100=--policy-file {rules}",
            "--extra-args", f"flowlog=--flow-log {flows} --flow-log-size 1073741824"]
    if args.quick:
        cmd.append("--quick")
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    res = json.loads((out / "peers.json").read_text())
    rows = ["| variant | connections/s | cost | RR p50 us | cost | RR p99 us |",
            "|---|---|---|---|---|---|"]
    base_cps = metric(res, "plain", "tap", "crr_out", "cps")
    base_p50 = metric(res, "plain", "tap", "rr_out", "p50_us")
    verdicts = []
    for v in VARIANTS:
        cps = metric(res, v, "tap", "crr_out", "cps")
        p50 = metric(res, v, "tap", "rr_out", "p50_us")
        p99 = metric(res, v, "tap", "rr_out", "p99_us")
        c_cost = None if None in (cps, base_cps) else 1 - cps / base_cps
        l_cost = None if None in (p50, base_p50) else p50 / base_p50 - 1
        rows.append(f"| {v} | {fmt(cps)} | {_pct(c_cost)} | {fmt(p50)} | {_pct(l_cost)} | "
                    f"{fmt(p99)} |")
        if v != "plain":
            for what, cost in (("connections/s", c_cost), ("RR p50", l_cost)):
                ok = None if cost is None else cost < TARGET
                verdicts.append(f"| {v} {what}: cost < 5 % | "
                                f"{'n/a' if ok is None else 'met' if ok else 'MISSED'} | "
                                f"{_pct(cost)} |")
    records = sum(1 for _ in flows.open()) if flows.exists() else 0
    text = "\n".join(rows + ["", "| target | verdict | measured |", "|---|---|---|"]
                     + verdicts + ["", f"flow log: {records} records in {flows}"])
    (out / "report.md").write_text(text + "\n")
    print(text)
    print(f"\nreport: {out / 'report.md'}")
    return 0


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v * 100:+.1f} %"


if __name__ == "__main__":
    sys.exit(main())
