"""Mangled frames from the guest are counted and dropped: nothing escapes, no flow leaks.

integration/garbage.py runs the whole data plane (demux, ARP/DHCP/NDP/DHCPv6
responders, TCP, UDP, ICMP) on tens of thousands of frames derived from valid
ones, in a network namespace of its own with only loopback, so mangled
addresses reach nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from integration.conftest import run

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("seed", [11, 12])
def test_mangled_frames_are_dropped_without_harm(seed):
    r = run(["unshare", "-n", "sh", "-c",
             f"ip link set lo up && exec {sys.executable} -m integration.garbage 30000 {seed}"],
            cwd=ROOT, timeout=300)
    report = json.loads(r.stdout.splitlines()[-1])
    assert report["escaped"] == [], report["escaped"][0]
    assert report["handler_errors"] == 0
    assert report["established_before"] == 1
    assert report["tcp_left"] == [], report["tcp_left"]
    dropped = report["dropped"]
    # the mangling reached every layer: Ethernet, both IP versions, TCP's own checks
    for why in ("runt", "ethertype", "ipv4", "ipv6", "fragment"):
        assert dropped.get(why, 0) > 0, dropped
    tcp = report["tcp"]
    assert tcp.get("malformed", 0) + tcp.get("runt", 0) > 0, tcp
    assert tcp.get("duplicate", 0) + tcp.get("out_of_order", 0) > 0, tcp   # hit the live flow
