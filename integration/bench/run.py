#!/usr/bin/env python3
"""Benchmark our pasta and passt against C pasta/passt and slirp4netns, and judge the targets.

The pasta figures come from the shared peer benchmark (`peers.py`: it makes
the namespace, attaches each tool to it by PID as rootless engines do, runs
iperf3 and request/response helpers, samples each tool's CPU and RSS), once
per MTU (65520 and 1500).  Then, unless skipped, the benchmarks of this
directory: `startup.py` (start-up to a configured namespace, both ways pasta
is started), `idle.py` (wake-ups per second and RSS with 0, 200 and 1000
idle connections) and `passt_bench.py` (passt: a QEMU guest's throughput and
passt's CPU per GB and peak RSS).  Every figure is one row: ours, C pasta
(or passt), slirp4netns, the ratio ours/C, the target and the verdict; the
rows are printed (markdown), written as JSON (`results.json`) and drawn as an
SVG bar chart (`results.svg`, per group of figures: ours vs C vs slirp4netns).

Targets: issue 14's (request/response and connections/s as ratios to C
pasta, start-up <= 150 ms, <= 2 wake-ups/s idle, pasta RSS idle <= 30 MiB,
passt's CPU per GB <= 1.3 x C passt's at a guest throughput at least C
passt's, passt's peak RSS <= 35 MiB) and no throughput row under C pasta's.

    integration/bench/run.py [--rounds 3] [--quick] [--mtu 65520,1500] [--skip startup,idle,passt]
                             [--out DIR] [--chart FILE] [--peers PATH] [--pasta PATH]
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

# (group, label, path, test, metric, target): the peer benchmark's rows.  A target is
# ("ratio<=", x) or ("ratio>=", x) against C pasta, ("<=", x) absolute, or None (shown only).
AT_LEAST_C = ("ratio>=", 1.0)
ROWS = [
    ("pasta throughput, Gbit/s", "TCP ns->host 1 stream", "tap", "tcp_out", "gbps", AT_LEAST_C),
    ("pasta throughput, Gbit/s", "TCP ns->host 4 streams", "tap", "tcp_out_p4", "gbps",
     AT_LEAST_C),
    ("pasta throughput, Gbit/s", "TCP host->ns (ns-opened)", "tap", "tcp_rev", "gbps",
     AT_LEAST_C),
    ("pasta throughput, Gbit/s", "TCP host->ns port forward", "tap", "tcp_in", "gbps",
     AT_LEAST_C),
    ("pasta throughput, Gbit/s", "splice ns->host 1 stream", "splice", "tcp_out", "gbps",
     AT_LEAST_C),
    ("pasta throughput, Gbit/s", "splice ns->host 4 streams", "splice", "tcp_out_p4", "gbps",
     AT_LEAST_C),
    ("pasta throughput, Gbit/s", "splice host->ns (ns-opened)", "splice", "tcp_rev", "gbps",
     AT_LEAST_C),
    ("pasta throughput, Gbit/s", "splice host->ns port forward", "splice", "tcp_in", "gbps",
     AT_LEAST_C),
    ("pasta latency, us", "TCP RR ns->host p50 (tap)", "tap", "rr_out", "p50_us",
     ("ratio<=", 1.25)),
    ("pasta latency, us", "TCP RR ns->host p99 (tap)", "tap", "rr_out", "p99_us",
     ("ratio<=", 1.3)),
    ("pasta latency, us", "TCP RR host->ns p50 (tap)", "tap", "rr_in", "p50_us", None),
    ("pasta latency, us", "TCP RR ns->host p50 (splice)", "splice", "rr_out", "p50_us",
     ("ratio<=", 1.15)),
    ("pasta latency, us", "UDP RR ns->host p50", "tap", "udp_rr_out", "p50_us", None),
    ("pasta connections/s", "connections/s ns->host (tap)", "tap", "crr_out", "cps", AT_LEAST_C),
    ("pasta connections/s", "connections/s ns->host (splice)", "splice", "crr_out", "cps",
     AT_LEAST_C),
    ("pasta UDP", "UDP 100 Mbit/s ns->host, received Mbit/s", "tap", "udp_out", "mbps", None),
    ("pasta UDP", "UDP 100 Mbit/s loss %", "tap", "udp_out", "loss_pct", None),
    ("pasta CPU", "CPU ms per GB, TCP ns->host", "tap", "tcp_out", "tool_cpu_ms_per_gb", None),
    ("pasta CPU", "CPU ms per GB, TCP host->ns", "tap", "tcp_in", "tool_cpu_ms_per_gb", None),
]
IMPL_KEYS = (("ours", "ours"), ("c", "pasta-c"), ("slirp", "slirp4netns"))


def find_peers(explicit: str | None) -> str:
    for cand in [explicit or "", *PEERS_CANDIDATES]:
        if cand and Path(cand).is_file():
            return cand
    sys.exit("bench: peers.py not found (--peers PATH or $PEERS_PY)")


def our_prefix() -> Path:
    return Path(os.environ.get("PASST_PY_PREFIX", "/opt/passt-py"))


def our_pasta(explicit: str | None) -> str:
    if explicit:
        return explicit
    exe = our_prefix() / "bin" / "pasta"
    if not exe.exists():
        sys.exit(f"bench: {exe} not found (tools/install.sh, --pasta or $PASST_PY_PREFIX)")
    return str(exe)


def run_peers(peers: str, pasta: str, mtu: int, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, peers, "--impl", f"ours=pasta:{pasta}", "--impl", "pasta-c=pasta",
           "--impl", "slirp4netns=slirp4netns", "--no-baseline", "--out-dir", str(out),
           "--json", str(out / f"peers-mtu{mtu}.json"), "--rounds", str(args.rounds)]
    if args.quick:
        cmd.append("--quick")
    # peers.py stops starting tests after its budget (240 s with --quick, 600 s without),
    # which with three impls cuts the last round short: give every round its share
    cmd += ["--budget", str((240 if args.quick else 600) * args.rounds)]
    if args.tests:
        cmd += ["--tests", args.tests]
    if mtu != 65520:
        cmd += ["--extra-args", f"ours=-m {mtu}", "--extra-args", f"pasta-c=-m {mtu}",
                "--extra-args", f"slirp4netns=--mtu={mtu}"]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((out / f"peers-mtu{mtu}.json").read_text())


def bench_python() -> str:
    """Our install's interpreter: the benchmarks below import our packages (and theirs,
    python-prctl, pyroute2), which the python3 that runs this script may not have."""
    exe = our_prefix() / "bin" / "python"
    return str(exe) if exe.exists() else sys.executable


def run_json(script: str, extra: list[str], out: Path, name: str) -> dict | list | None:
    """One of this directory's benchmarks, its JSON; None (and a note) if it failed."""
    dest = out / f"{name}.json"
    cmd = [bench_python(), str(HERE / script), *extra, "--json", str(dest)]
    print("$ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        print(f"bench: {script} failed: its rows are left out", file=sys.stderr)
        return None
    return json.loads(dest.read_text())


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


def figure(group: str, label: str, ours: float | None, c: float | None,
           slirp: float | None, target: tuple[str, float] | None) -> dict:
    """One row: the values, ours/C, the target as text and the verdict."""
    ratio = ours / c if ours is not None and c else None
    text, verdict = "", ""
    if target is not None:
        kind, limit = target
        if kind == "<=":
            text = f"<= {limit:g}"
            ok = None if ours is None else ours <= limit
        else:
            text = f"{kind[-2:]} {limit:g} x C"
            ok = None if ratio is None else (ratio <= limit if kind == "ratio<=" else
                                             ratio >= limit)
        verdict = "n/a" if ok is None else ("met" if ok else "MISSED")
    return {"group": group, "label": label, "ours": ours, "c": c, "slirp": slirp,
            "ratio": None if ratio is None else round(ratio, 3), "target": text,
            "verdict": verdict}


def peer_figures(res: dict, mtu: int) -> list[dict]:
    out = []
    suffix = "" if mtu == 65520 else f" (MTU {mtu})"
    for group, label, path, test, key, target in ROWS:
        vals = {k: metric(res, impl, path, test, key) for k, impl in IMPL_KEYS}
        if path != "tap":
            vals["slirp"] = None                       # slirp4netns has no splice path
        out.append(figure(group + suffix, label, vals["ours"], vals["c"], vals["slirp"],
                          target))
    for t in ("tcp_out", "tcp_out_p4", "tcp_rev", "tcp_in"):
        st = stalled(res, "ours", "tap", t)
        if st:
            out.append({**figure("pasta stalls" + suffix, f"tap {t}: stalled", None, None,
                                 None, None), "verdict": "MISSED",
                        "target": "no 0.5 s interval under 10 % of the median"})
    mib = {k: (res["results"].get(impl) or {}) for k, impl in IMPL_KEYS}
    idle = {k: (r.get("rss_idle_kb") or 0) / 1024 or None for k, r in mib.items()}
    load = {k: (r.get("rss_load_max_kb") or 0) / 1024 or None for k, r in mib.items()}
    out.append(figure("pasta memory, MiB" + suffix, "RSS idle (peers.py)", idle["ours"],
                      idle["c"], idle["slirp"], ("<=", 30.0)))
    flat = None if idle["ours"] is None else ("<=", round(idle["ours"] + 8, 1))
    out.append(figure("pasta memory, MiB" + suffix, "RSS max under load (idle + 8)",
                      load["ours"], load["c"], load["slirp"], flat))
    return out


def startup_figures(res: dict) -> list[dict]:
    out = []
    for case, label in (("command", "pasta --config-net -- true"),
                        ("podman", "podman's pattern (--netns PATH, daemon)")):
        r = res["cases"].get(case) or {}
        out.append(figure("start-up to a configured namespace, ms", label,
                          (r.get("ours") or {}).get("median"),
                          (r.get("pasta-c") or {}).get("median"), None, ("<=", 150.0)))
    return out


def idle_figures(res: dict) -> list[dict]:
    out = []
    r = res["results"]
    counts = sorted({int(c) for impl in r.values() for c in impl}, key=int)
    for count in counts:
        vals = {k: (r.get(impl) or {}).get(str(count), {}).get("wakeups_per_s")
                for k, impl in IMPL_KEYS}
        out.append(figure("idle wake-ups per second", f"{count} idle connections",
                          vals["ours"], vals["c"], vals["slirp"], ("<=", 2.0)))
    for count in counts:
        vals = {k: (r.get(impl) or {}).get(str(count), {}).get("rss_mib")
                for k, impl in IMPL_KEYS}
        out.append(figure("pasta memory, MiB", f"RSS idle, {count} connections (idle.py)",
                          vals["ours"], vals["c"], vals["slirp"],
                          ("<=", 30.0) if count == 0 else None))
    return out


def passt_figures(rows: list) -> list[dict]:
    by = {r["impl"]: r for r in rows}
    ours, vhost, c = by.get("ours") or {}, by.get("vhost") or {}, by.get("c") or {}
    out = []
    for d, label in (("up", "guest->host"), ("down", "host->guest")):
        get = lambda r, k, d=d: (r.get(d) or {}).get(k)  # noqa: E731
        out.append(figure("passt CPU per GB, s", f"{label}, stream socket",
                          get(ours, "cpu_s_per_gb"), get(c, "cpu_s_per_gb"), None,
                          ("ratio<=", 1.3)))
        out.append(figure("passt CPU per GB, s", f"{label}, vhost-user (C: stream)",
                          get(vhost, "cpu_s_per_gb"), get(c, "cpu_s_per_gb"), None, None))
        out.append(figure("passt guest throughput, Mbit/s", f"{label}, stream socket",
                          get(ours, "mbit_s"), get(c, "mbit_s"), None, AT_LEAST_C))
        out.append(figure("passt guest throughput, Mbit/s", f"{label}, vhost-user (C: stream)",
                          get(vhost, "mbit_s"), get(c, "mbit_s"), None, None))
    out.append(figure("passt memory, MiB", "peak RSS, stream socket", ours.get("peak_rss_mib"),
                      c.get("peak_rss_mib"), None, ("<=", 35.0)))
    out.append(figure("passt memory, MiB", "peak RSS, vhost-user", vhost.get("peak_rss_mib"),
                      c.get("peak_rss_mib"), None, None))
    out.append(figure("passt memory, MiB", "peak RSS, vhost-user, without the guest's memory",
                      vhost.get("peak_own_rss_mib"), c.get("peak_rss_mib"), None, None))
    return out


def table(figures: list[dict]) -> str:
    out = ["| figure | ours | C | slirp4netns | ours/C | target | verdict |",
           "|---|---|---|---|---|---|---|"]
    group = None
    for f in figures:
        if f["group"] != group:
            group = f["group"]
            out.append(f"| **{group}** | | | | | | |")
        ratio = "–" if f["ratio"] is None else f"{f['ratio']:.2f}"
        out.append(f"| {f['label']} | {fmt(f['ours'])} | {fmt(f['c'])} | {fmt(f['slirp'])} | "
                   f"{ratio} | {f['target']} | {f['verdict']} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", help="path of peers.py (default: ../shared/bench/peers.py)")
    p.add_argument("--pasta", help="our pasta executable (default: $PASST_PY_PREFIX/bin/pasta)")
    p.add_argument("--quick", action="store_true", help="short runs (peers.py --quick, "
                   "fewer start-up runs, 5 s idle, 64 MiB passt transfers)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds (peers.py, "
                   "passt_bench.py)")
    p.add_argument("--mtu", default="65520,1500", help="comma list of MTUs to run")
    p.add_argument("--tests", help="peers.py --tests subset")
    p.add_argument("--skip", default="", help="comma list of: peers, startup, idle, passt")
    p.add_argument("--out", help="directory for the JSON, the report and the chart")
    p.add_argument("--chart", type=Path, help="also write the chart here (the README's: "
                   "integration/bench/results.svg)")
    p.add_argument("--from", dest="from_dir", type=Path, help="measure nothing: rebuild the "
                   "report, JSON and chart from the JSON files a run left in this directory")
    args = p.parse_args()
    if args.from_dir:
        return report(args, args.from_dir, rebuild(args.from_dir, args.mtu), os.getloadavg())
    if os.geteuid() != 0:
        sys.exit("bench: run as root (namespaces, tap devices)")
    skip = {s for s in args.skip.split(",") if s}
    pasta = our_pasta(args.pasta)
    out = Path(args.out or tempfile.mkdtemp(prefix="passt-py-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    figures: list[dict] = []
    if "peers" not in skip:
        peers = find_peers(args.peers)
        for mtu in (int(m) for m in args.mtu.split(",")):
            figures += peer_figures(run_peers(peers, pasta, mtu, args, out), mtu)
    if "startup" not in skip:
        res = run_json("startup.py", ["--ours", pasta, "--runs", "5" if args.quick else "15"],
                       out, "startup")
        figures += startup_figures(res) if res else []
    if "idle" not in skip:
        res = run_json("idle.py", ["--ours", pasta, "--seconds", "5" if args.quick else "20"],
                       out, "idle")
        figures += idle_figures(res) if res else []
    if "passt" not in skip:
        res = run_json("passt_bench.py", ["--rounds", str(args.rounds), "--size",
                                          "64" if args.quick else "256"], out, "passt")
        figures += passt_figures(res) if res else []
    return report(args, out, figures, load)


def rebuild(where: Path, mtus: str) -> list[dict]:
    """The figures from the JSON files of an earlier run."""
    figures: list[dict] = []
    for mtu in (int(m) for m in mtus.split(",")):
        f = where / f"peers-mtu{mtu}.json"
        if f.exists():
            figures += peer_figures(json.loads(f.read_text()), mtu)
    for name, fn in (("startup", startup_figures), ("idle", idle_figures),
                     ("passt", passt_figures)):
        f = where / f"{name}.json"
        if f.exists():
            figures += fn(json.loads(f.read_text()))
    return figures


def report(args: argparse.Namespace, out: Path, figures: list[dict],
           load: tuple[float, ...]) -> int:
    """Print the table; write report.md, results.json and results.svg to `out`."""
    order = list(dict.fromkeys(f["group"] for f in figures))
    figures.sort(key=lambda f: order.index(f["group"]))      # a group's rows together
    when = subprocess.run(["date", "-u", "+%Y-%m-%d %H:%M UTC"], capture_output=True,
                          text=True).stdout.strip()
    after = os.getloadavg()
    note = (f"{when}, medians of {args.rounds} round(s){', quick' if args.quick else ''}, "
            f"load average {load[0]:.2f} before / {after[0]:.2f} after")
    text = f"{note}\n\n{table(figures)}\n"
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps(
        {"when": when, "argv": sys.argv, "rounds": args.rounds, "quick": args.quick,
         "load_before": load, "load_after": after, "figures": figures}, indent=1))
    from chart import render  # this directory's module

    svg = render(figures, "passt for Python vs C pasta/passt vs slirp4netns", note)
    (out / "results.svg").write_text(svg)
    if args.chart:
        args.chart.parent.mkdir(parents=True, exist_ok=True)
        args.chart.write_text(svg)
    print(text)
    missed = [f for f in figures if f["verdict"] == "MISSED"]
    print(f"{len(missed)} target(s) missed of {sum(1 for f in figures if f['target'])}")
    print(f"report: {out / 'report.md'}, JSON: {out / 'results.json'}, "
          f"chart: {out / 'results.svg'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
