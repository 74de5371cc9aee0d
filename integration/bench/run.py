#!/usr/bin/env python3
"""Benchmark our pasta against C pasta and slirp4netns in the same run, and judge the targets.

The measuring is done by the shared peer benchmark (`peers.py`: it makes the
namespace, attaches each tool to it by PID as rootless engines do, runs
iperf3 and request/response helpers, samples each tool's CPU and RSS).  This
script runs it once per MTU (65520 and 1500), then reads its JSON results and
prints one table per MTU with ours, C pasta and slirp4netns side by side, the
ratios, and whether each target of the TCP issue is met:

- tap throughput, both directions: >= slirp4netns and >= 0.7 x C pasta, and
  no stalls (no half-second interval under 10 % of the run's median);
- splice throughput: >= 0.9 x C pasta;
- connections/s and request/response p50: within 1.5 x of C pasta;
- RSS idle <= 40 MiB, and flat under load.

    integration/bench/run.py [--quick] [--peers PATH] [--pasta PATH] [--mtu 65520,1500]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PEERS_CANDIDATES = [os.environ.get("PEERS_PY", ""), str(REPO.parent / "shared/bench/peers.py"),
                    "/work/shared/bench/peers.py"]

# (label, path, test, metric, better): rows of the table
ROWS = [
    ("TCP ns->host 1 stream, Gbit/s", "tap", "tcp_out", "gbps", "high"),
    ("TCP ns->host 4 streams, Gbit/s", "tap", "tcp_out_p4", "gbps", "high"),
    ("TCP host->ns (ns-opened), Gbit/s", "tap", "tcp_rev", "gbps", "high"),
    ("TCP host->ns port forward, Gbit/s", "tap", "tcp_in", "gbps", "high"),
    ("splice ns->host 1 stream, Gbit/s", "splice", "tcp_out", "gbps", "high"),
    ("splice ns->host 4 streams, Gbit/s", "splice", "tcp_out_p4", "gbps", "high"),
    ("splice host->ns (ns-opened), Gbit/s", "splice", "tcp_rev", "gbps", "high"),
    ("splice host->ns port forward, Gbit/s", "splice", "tcp_in", "gbps", "high"),
    ("TCP RR ns->host p50, us", "tap", "rr_out", "p50_us", "low"),
    ("TCP RR ns->host p99, us", "tap", "rr_out", "p99_us", "low"),
    ("TCP RR host->ns p50, us", "tap", "rr_in", "p50_us", "low"),
    ("splice RR ns->host p50, us", "splice", "rr_out", "p50_us", "low"),
    ("connections/s ns->host", "tap", "crr_out", "cps", "high"),
    ("splice connections/s ns->host", "splice", "crr_out", "cps", "high"),
    ("UDP 100 Mbit/s ns->host, received Mbit/s", "tap", "udp_out", "mbps", "high"),
    ("UDP 100 Mbit/s loss %", "tap", "udp_out", "loss_pct", "low"),
    ("UDP RR ns->host p50, us", "tap", "udp_rr_out", "p50_us", "low"),
    ("CPU ms per GB, TCP ns->host", "tap", "tcp_out", "tool_cpu_ms_per_gb", "low"),
    ("CPU ms per GB, TCP host->ns", "tap", "tcp_in", "tool_cpu_ms_per_gb", "low"),
]


def find_peers(explicit: str | None) -> str:
    for cand in [explicit or ""] + PEERS_CANDIDATES:
        if cand and Path(cand).is_file():
            return cand
    sys.exit("bench: peers.py not found (give --peers PATH or set PEERS_PY)")


def our_pasta(explicit: str | None) -> str:
    if explicit:
        return explicit
    prefix = Path(os.environ.get("PASST_PY_PREFIX", "/opt/passt-py"))
    exe = prefix / "bin" / "pasta"
    if exe.exists():
        return str(exe)
    sys.exit(f"bench: {exe} not found: run tools/install.sh first, or give --pasta")


def run_peers(peers: str, pasta: str, mtu: int, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, peers, "--impl", f"ours=pasta:{pasta}", "--impl", "pasta-c=pasta",
           "--impl", "slirp4netns=slirp4netns", "--no-baseline", "--out-dir", str(out),
           "--json", str(out / f"peers-mtu{mtu}.json"), "--rounds", str(args.rounds)]
    if args.quick:
        cmd.append("--quick")
    if args.tests:
        cmd += ["--tests", args.tests]
    if mtu != 65520:
        cmd += ["--extra-args", f"ours=-m {mtu}", "--extra-args", f"pasta-c=-m {mtu}",
                "--extra-args", f"slirp4netns=--mtu={mtu}"]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((out / f"peers-mtu{mtu}.json").read_text())


def metric(res: dict, impl: str, path: str, test: str, key: str) -> float | None:
    try:
        return res["results"][impl]["paths"][path][test]["median"][key]
    except (KeyError, TypeError):
        return None


def stalled(res: dict, impl: str, path: str, test: str) -> bool | None:
    """Any half-second interval under 10 % of the run's median interval?"""
    try:
        reps = res["results"][impl]["paths"][path][test]["reps"]
    except (KeyError, TypeError):
        return None
    for rep in reps:
        ivs = rep.get("intervals_gbps") or []
        if len(ivs) >= 2 and min(ivs) < 0.1 * statistics.median(ivs):
            return True
    return False


def fmt(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}"


def judge(res: dict) -> list[str]:
    lines = []

    def check(name: str, ok: bool | None, detail: str) -> None:
        verdict = "n/a" if ok is None else ("met" if ok else "MISSED")
        lines.append(f"| {name} | {verdict} | {detail} |")

    for t in ("tcp_out", "tcp_out_p4", "tcp_rev", "tcp_in"):
        o, c = metric(res, "ours", "tap", t, "gbps"), metric(res, "pasta-c", "tap", t, "gbps")
        s = metric(res, "slirp4netns", "tap", t, "gbps")
        ok = None if o is None or c is None else (o >= 0.7 * c and (s is None or o >= s))
        check(f"tap {t}: >= 0.7 x C pasta and >= slirp4netns", ok,
              f"ours {fmt(o)}, C {fmt(c)}, slirp {fmt(s)} Gbit/s")
        st = stalled(res, "ours", "tap", t)
        check(f"tap {t}: no stalls", None if st is None else not st,
              {None: "not measured", False: "no 0.5-s interval under 10 % of the median",
               True: "stalled"}[st])
    for t in ("tcp_out", "tcp_out_p4", "tcp_rev", "tcp_in"):
        o, c = metric(res, "ours", "splice", t, "gbps"), metric(res, "pasta-c", "splice", t, "gbps")
        check(f"splice {t}: >= 0.9 x C pasta", None if o is None or c is None else o >= 0.9 * c,
              f"ours {fmt(o)}, C {fmt(c)} Gbit/s")
    o = metric(res, "ours", "tap", "crr_out", "cps")
    c = metric(res, "pasta-c", "tap", "crr_out", "cps")
    check("connections/s: within 1.5 x of C pasta",
          None if o is None or c is None else o * 1.5 >= c, f"ours {fmt(o)}, C {fmt(c)}")
    for t in ("rr_out", "rr_in"):
        o, c = metric(res, "ours", "tap", t, "p50_us"), metric(res, "pasta-c", "tap", t, "p50_us")
        check(f"{t} p50: within 1.5 x of C pasta",
              None if o is None or c is None else o <= 1.5 * c, f"ours {fmt(o)}, C {fmt(c)} us")
    r = res["results"].get("ours", {})
    idle, load = r.get("rss_idle_kb"), r.get("rss_load_max_kb")
    check("RSS idle <= 40 MiB", None if idle is None else idle <= 40 * 1024,
          f"{fmt(idle / 1024 if idle else None)} MiB")
    check("RSS flat under load (<= idle + 8 MiB)",
          None if idle is None or load is None else load <= idle + 8 * 1024,
          f"max {fmt(load / 1024 if load else None)} MiB")
    return lines


def report(res: dict, mtu: int) -> str:
    out = [f"### MTU {mtu}", "",
           "| test | ours | C pasta | slirp4netns | ours/C | ours/slirp |",
           "|---|---|---|---|---|---|"]
    for label, path, test, key, _better in ROWS:
        o = metric(res, "ours", path, test, key)
        c = metric(res, "pasta-c", path, test, key)
        s = metric(res, "slirp4netns", path, test, key) if path == "tap" else None
        out.append(f"| {label} | {fmt(o)} | {fmt(c)} | {fmt(s)} | {ratio(o, c)} | {ratio(o, s)} |")
    for impl in ("ours", "pasta-c", "slirp4netns"):
        r = res["results"].get(impl, {})
        idle, load = r.get("rss_idle_kb"), r.get("rss_load_max_kb")
        start = (r.get("setup") or {}).get("startup_s")
        out.append(f"| {impl}: start-up ms / RSS idle / max MiB | "
                   f"{fmt(start * 1000 if start else None)} / "
                   f"{fmt(idle / 1024 if idle else None)} / {fmt(load / 1024 if load else None)}"
                   " | | | | |")
    out += ["", "| target | verdict | measured |", "|---|---|---|"] + judge(res) + [""]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", help="path of peers.py (default: ../shared/bench/peers.py)")
    p.add_argument("--pasta", help="our pasta executable (default: $PASST_PY_PREFIX/bin/pasta)")
    p.add_argument("--quick", action="store_true", help="short runs (peers.py --quick)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds (peers.py)")
    p.add_argument("--mtu", default="65520,1500", help="comma list of MTUs to run")
    p.add_argument("--tests", help="peers.py --tests subset")
    p.add_argument("--out", help="directory for JSON and the markdown report")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root (namespaces, tap devices)")
    peers, pasta = find_peers(args.peers), our_pasta(args.pasta)
    out = Path(args.out or tempfile.mkdtemp(prefix="passt-py-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for mtu in (int(m) for m in args.mtu.split(",")):
        sections.append(report(run_peers(peers, pasta, mtu, args, out), mtu))
    text = "\n".join(sections)
    (out / "report.md").write_text(text)
    print(text)
    print(f"\nreport: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
