"""A sample of the structure-aware fuzzer (`integration/fuzz.py`): about a minute.

The long run (10^6 frames, with its figures) is `integration/bench/fuzz_long.py`.
Here: 250 000 frames of every kind, mutated, through both tap backends into two
real data planes in a network namespace of this test's own: nothing may
escape a handler, every flow must end once the guest goes quiet, no
descriptor may stay open, and the frames must have reached every layer
(so that a generator gone wrong cannot pass for a robust data plane).
"""

from __future__ import annotations

import pytest

from integration import fuzz
from tests.support import in_fresh_netns, make_conf

FRAMES = 250_000


def confs():
    none = {"tcp_ports": ["none"], "udp_ports": ["none"]}
    return (make_conf("pasta", tcp_ns=["none"], udp_ns=["none"], **none),
            make_conf("passt", **none))


@pytest.mark.parametrize("seed", [20261130])
def test_fuzz_sample(seed):
    rep = in_fresh_netns(lambda: fuzz.run(FRAMES, seed, confs=confs()),
                         ping_groups="0 2147483647", timeout=600)
    assert rep.exceptions == 0, rep.errors
    assert rep.flows_left == {"pasta": 0, "passt": 0}, rep.flows_left
    assert rep.fds_left == 0 and rep.budget_left == 0, (rep.fds_left, rep.budget)
    # every frame written reached its data plane, and the data planes answered
    for plane in ("pasta", "passt"):
        assert rep.frames_in[plane] == rep.sent[plane] > FRAMES // 3, (rep.sent, rep.frames_in)
        assert rep.frames_out[plane] > FRAMES // 20, rep.frames_out
        c = rep.counters[plane]
        for key in ("frames.runt", "frames.ipv4", "frames.ipv6", "frames.fragment",
                    "tcp.malformed", "tcp.bad_addr", "tcp.out_of_order", "tcp.duplicate",
                    "tcp.window_probe", "udp.opened", "udp.malformed", "udp.bad_addr",
                    "udp.icmp_error", "icmp.opened", "icmp.not_echo"):
            if key == "frames.runt" and plane == "pasta":
                continue            # the tap device pads runts to the Ethernet minimum
            assert c.get(key, 0) > 0, (plane, key, c)
    # live TCP connections carried data to the host both ways
    assert rep.echo["tcp_connections"] > 100 and rep.echo["tcp_bytes"] > 10_000, rep.echo
    # a sanity bound, not the flatness the long run measures
    assert rep.rss_kib[-1][1] < 200 * 1024, rep.rss_kib
