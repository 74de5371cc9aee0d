"""common.rtnl on this machine's own netlink: a dump and a refused change
(nothing is modified: the change names a link that does not exist).  It runs
in a helper child, as in pasta, so that this process keeps pyroute2 whole."""

from __future__ import annotations

import errno
import socket

from common.helper import Helper


def dump_lo() -> list:
    from common.rtnl import RTM_GETADDR, Rtnl, ifaddrmsg

    with Rtnl() as nl:
        lo = nl.link_index("lo")
        addrs = [a.get_attr("IFA_ADDRESS") for a in nl.dump(ifaddrmsg, RTM_GETADDR,
                                                            family=socket.AF_INET)
                 if a["index"] == lo]
        return [lo, nl.link_index("no-such-link0"), addrs]


def refused_change() -> list:
    from common.rtnl import RTM_NEWLINK, NetlinkError, Rtnl, ifinfmsg

    with Rtnl() as nl:
        try:
            nl.change(ifinfmsg, RTM_NEWLINK, {"index": 0x7FFFFFF0}, [("IFLA_MTU", 1500)])
        except NetlinkError as exc:
            return [exc.code, nl.link_index("lo")]     # the socket still answers after
        return [0, None]


def run(fn) -> list:
    helper = Helper(preload=("common.rtnl",), bypass_init=("pyroute2",))
    try:
        return helper.call(fn)
    finally:
        helper.close()


def test_dump_finds_loopback():
    lo, missing, addrs = run(dump_lo)
    assert lo == socket.if_nametoindex("lo")
    assert missing is None
    assert addrs in ([], ["127.0.0.1"])                 # lo may be down here


def test_refused_change_raises_the_errno():
    assert run(refused_change) == [errno.ENODEV, socket.if_nametoindex("lo")]
