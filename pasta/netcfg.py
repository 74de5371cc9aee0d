"""Configuring the namespace's links through netlink (pyroute2), in a helper process.

What C pasta does, and podman expects from `--config-net`: `lo` up; the tap
with our MTU and, if given, its MAC; with `--config-net` the host's addresses
(IPv6 ones `nodad`, the link-local too) and routes copied onto it and the link up.  Without
`--config-net` only `lo` and the MTU/MAC are set, and the guest configures
itself through DHCP, SLAAC or DHCPv6.

pyroute2 costs memory and time to import, so all of this runs in the helper
process (`common.helper.Helper`, forked at start-up with pyroute2's message
classes loaded meanwhile), which enters the namespace, configures it and
exits: none of that cost stays in pasta.  The requests go through
`common.rtnl` (blocking, one at a time), not pyroute2's asyncio `IPRoute`.
"""

from __future__ import annotations

import errno
import ipaddress
from socket import AF_INET, AF_INET6

from common.record import asdict, field, record

TYPE_CHECKING = False            # the helper imports this module: only what it needs
if TYPE_CHECKING:
    from common.conf import Config
    from common.helper import Helper

IFA_F_NODAD = 0x02
IFA_F_TENTATIVE = 0x40
IFF_UP = 0x1
RT_SCOPE_LINK = 253
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3                         # as ip(8) marks the routes it adds
RTN_UNICAST = 1


@record
class NetPlan:
    """Everything the helper applies, as plain data."""
    ifname: str | None                  # None: --splice-only, no tap
    mtu: int
    mac: str | None = None
    up: bool = False
    addrs: list[tuple[str, int]] = field(default_factory=list)
    routes: list[tuple[str, str | None, int]] = field(default_factory=list)  # dst, gw, metric


def plan(conf: Config, ifname: str, mac: str | None, *, config_net: bool,
         copy_addrs: bool, copy_routes: bool) -> NetPlan:
    p = NetPlan(ifname=ifname, mtu=conf.mtu, mac=mac, up=config_net)
    if not config_net:
        return p
    for fam in (conf.ip4, conf.ip6):
        if fam is None:
            continue
        host_addrs = [(str(i.ip), i.network.prefixlen) for i in fam.host_addrs]
        if fam.addr is not None:            # None: IPv6 local mode, the link-local only
            guest = (str(fam.addr), fam.prefix_len)
            if copy_addrs and guest in host_addrs:
                p.addrs += [guest] + [a for a in host_addrs if a != guest]
            else:
                p.addrs.append(guest)
        host_gw = next((r.gateway for r in fam.host_routes if r.dst == "default"), None)
        if copy_routes and fam.gateway is not None and str(fam.gateway) == host_gw:
            p.routes += [(r.dst, r.gateway, r.metric) for r in fam.host_routes]
        elif fam.gateway is not None:
            p.routes.append(("default", str(fam.gateway), 0))
    return p


def _apply(plan_dict: dict, netns_fd: int, userns_fd: int | None = None) -> dict:
    """Runs in the helper: enter the namespaces and apply the plan."""
    from common.rtnl import (  # only in the helper
        NLM_F_CREATE,
        NLM_F_EXCL,
        RTM_DELADDR,
        RTM_GETADDR,
        RTM_NEWADDR,
        RTM_NEWLINK,
        RTM_NEWROUTE,
        NetlinkError,
        Rtnl,
        ifaddrmsg,
        ifinfmsg,
        rtmsg,
    )
    from pasta.ns import CLONE_NEWNET, CLONE_NEWUSER, setns

    if userns_fd is not None:          # rootless: the user namespace gives the right to enter
        setns(userns_fd, CLONE_NEWUSER)
    setns(netns_fd, CLONE_NEWNET)
    p = NetPlan(**plan_dict)
    done: dict = {"addrs": [], "routes": []}

    def set_link(index: int, attrs: list, up: bool = False) -> None:
        fields = {"index": index, "flags": IFF_UP, "change": IFF_UP} if up else {"index": index}
        nl.change(ifinfmsg, RTM_NEWLINK, fields, attrs)

    def addr(msg_type: int, index: int, address: str, prefixlen: int, flags: int) -> None:
        v6 = ":" in address
        attrs = [("IFA_ADDRESS", address)] if v6 else [("IFA_LOCAL", address),
                                                       ("IFA_ADDRESS", address)]
        if flags:
            attrs.append(("IFA_FLAGS", flags))
        nl.change(ifaddrmsg, msg_type,
                  {"family": AF_INET6 if v6 else AF_INET, "prefixlen": prefixlen,
                   "flags": flags & 0xFF, "scope": 0, "index": index},
                  attrs, NLM_F_CREATE | NLM_F_EXCL if msg_type == RTM_NEWADDR else 0)

    with Rtnl() as nl:
        lo = nl.link_index("lo")
        if lo is not None:
            set_link(lo, [], up=True)
        if not p.ifname:                    # --splice-only: no tap, only lo
            return done
        idx = nl.link_index(p.ifname)
        if idx is None:
            raise RuntimeError(f"tap {p.ifname} vanished from the namespace")
        attrs: list = [("IFLA_MTU", p.mtu)]
        if p.mac:
            attrs.append(("IFLA_ADDRESS", p.mac))
        set_link(idx, attrs)
        if p.up:
            set_link(idx, [], up=True)
            # The kernel's link-local stays tentative (duplicate address detection,
            # after a random delay of up to a second) and unusable meanwhile; in
            # IPv6 local mode it is the only address, and routes via fe80::1 need
            # it.  Like the global addresses, it gets no DAD: put it back "nodad".
            for a in nl.dump(ifaddrmsg, RTM_GETADDR, family=AF_INET6):
                if a["index"] == idx and a["scope"] == RT_SCOPE_LINK and (
                        (a.get_attr("IFA_FLAGS") or a["flags"]) & IFA_F_TENTATIVE):
                    ll, plen = a.get_attr("IFA_ADDRESS"), a["prefixlen"]
                    addr(RTM_DELADDR, idx, ll, plen, 0)
                    addr(RTM_NEWADDR, idx, ll, plen, IFA_F_NODAD)
        for address, prefix in p.addrs:
            try:
                addr(RTM_NEWADDR, idx, address, prefix, IFA_F_NODAD if ":" in address else 0)
                done["addrs"].append(f"{address}/{prefix}")
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise RuntimeError(f"cannot add address {address}/{prefix}: {exc}") from None
        # routes without a gateway first, so that gateways are reachable
        for dst, gw, metric in sorted(p.routes, key=lambda r: r[1] is not None):
            family = AF_INET6 if ":" in (gw or dst) else AF_INET
            if dst == "default":
                dst_len, route = 0, []
            else:
                net = ipaddress.ip_network(dst, strict=False)
                dst_len, route = net.prefixlen, [("RTA_DST", str(net.network_address))]
            route.append(("RTA_OIF", idx))
            if gw:
                route.append(("RTA_GATEWAY", gw))
            if metric:
                route.append(("RTA_PRIORITY", metric))
            try:
                nl.change(rtmsg, RTM_NEWROUTE,
                          {"family": family, "dst_len": dst_len, "table": RT_TABLE_MAIN,
                           "proto": RTPROT_BOOT, "scope": 0, "type": RTN_UNICAST},
                          route, NLM_F_CREATE | NLM_F_EXCL)
                done["routes"].append(f"{dst} via {gw}" if gw else dst)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise RuntimeError(f"cannot add route {dst}"
                                       f"{' via ' + gw if gw else ''}: {exc}") from None
    return done


def apply(helper: Helper, net_plan: NetPlan, netns_fd: int, userns_fd: int | None) -> dict:
    """Apply the plan inside the namespace, from the helper process."""
    fds = [netns_fd] if userns_fd is None else [netns_fd, userns_fd]
    return helper.call(_apply, asdict(net_plan), fds=fds)
