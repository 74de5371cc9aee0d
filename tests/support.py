"""Shared pieces of the unit tests: a made-up host, its Config, and running a loop briefly.

Nothing here touches the machine's network: the host is described by hand
(addresses from the documentation ranges), so Configs are built without
discovery.
"""

from __future__ import annotations

from ipaddress import IPv6Address

from common.conf import Config, build_config
from common.fwd import forward_config
from common.hostinfo import FamilyInfo, HostInfo
from common.loop import Loop

HOST4, GW4, DNS4 = "192.0.2.10", "192.0.2.1", "192.0.2.53"
HOST6, GW6 = "2001:db8:1::10", "fe80::1"
OUR_MAC = bytes.fromhex("021122334455")
GUEST_MAC = bytes.fromhex("525400123456")
GUEST_LL = IPv6Address("fe80::5054:ff:fe12:3456")
BCAST = b"\xff" * 6


def make_conf(mode: str = "passt", **opts) -> Config:
    """A Config for `mode` on the made-up host, with command-line options `opts`."""
    host = HostInfo(
        v4=FamilyInfo("eth0", GW4, ((HOST4, 24),)),
        v6=FamilyInfo("eth0", GW6, ((HOST6, 64),), link_local="fe80::2"),
        macs={"eth0": "02:11:22:33:44:55"}, nameservers=(DNS4,), search=("example.test",))
    return build_config(mode, opts, host, forward_parser=forward_config)


def spin(loop: Loop, seconds: float = 0.05) -> None:
    """Run the loop for a while (it dispatches socket events and timers)."""
    loop.call_later(seconds, lambda: loop.stop(0))
    loop.run()
    loop._exit_code = None      # noqa: SLF001 - let the next spin run again
