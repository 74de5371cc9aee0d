#!/usr/bin/env python3
"""The long fuzz run: 10^6 mutated guest frames through both tap backends.

    integration/bench/fuzz_long.py [--frames N] [--seed S] [--json FILE]

Runs `integration.fuzz.run` (see there for what is sent and how) in a network
namespace of its own, as root, and prints what issue 9 asks of it: exceptions
that escaped a handler, flows left after expiry, descriptors left open, and
the RSS of the process along the way (after the first tenth, when the flow
tables have filled, it should stay flat), with frames per second.  The
machine's load changes the speed, not the verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from integration import fuzz  # noqa: E402
from tests.support import in_fresh_netns, make_conf  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="write the whole report here")
    args = ap.parse_args()
    none = {"tcp_ports": ["none"], "udp_ports": ["none"]}
    confs = (make_conf("pasta", tcp_ns=["none"], udp_ns=["none"], **none),
             make_conf("passt", **none))
    rep = in_fresh_netns(lambda: fuzz.run(args.frames, args.seed, confs=confs, samples=50),
                         ping_groups="0 2147483647", timeout=24 * 3600)
    rss = [kib for _, kib in rep.rss_kib]
    tenth = rss[len(rss) // 10]
    summary = {
        "frames": rep.frames, "seed": rep.seed, "seconds": rep.seconds,
        "frames_per_second": round(rep.frames / rep.seconds) if rep.seconds else None,
        "sent": rep.sent, "frames_in": rep.frames_in, "frames_out": rep.frames_out,
        "exceptions_escaping_handlers": rep.exceptions, "errors": rep.errors,
        "flows_left_after_expiry": rep.flows_left, "descriptors_left": rep.fds_left,
        "budget_left": rep.budget_left, "budget": rep.budget,
        "rss_mib": {"first": round(rss[0] / 1024, 1), "after_first_tenth": round(tenth / 1024, 1),
                    "max": round(max(rss) / 1024, 1), "last": round(rss[-1] / 1024, 1)},
        "echo": rep.echo, "made": rep.made,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**summary, "rss_kib": rep.rss_kib, "counters": rep.counters}, f,
                      indent=1)
    ok = (rep.exceptions == 0 and not any(rep.flows_left.values()) and rep.fds_left == 0
          and rep.budget_left == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
