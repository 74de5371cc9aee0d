"""Configuring the namespace's links through netlink (pyroute2), in a helper process.

What C pasta does, and podman expects from `--config-net`: `lo` up; the tap
with our MTU and, if given, its MAC; with `--config-net` the host's addresses
(IPv6 ones `nodad`, the link-local too) and routes copied onto it and the link up.  Without
`--config-net` only `lo` and the MTU/MAC are set, and the guest configures
itself through DHCP, SLAAC or DHCPv6.

pyroute2 costs 25 MiB and a tenth of a second or more to import, so all of
this runs in the helper process (`common.helper.Helper`, forked at start-up
with pyroute2 loaded meanwhile), which enters the namespace, configures it
and exits: none of that cost stays in pasta.
"""

from __future__ import annotations

import errno
import ipaddress
from dataclasses import asdict, dataclass, field

from common.conf import Config
from common.helper import Helper

IFA_F_NODAD = 0x02
IFA_F_TENTATIVE = 0x40


@dataclass
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
    from pyroute2 import IPRoute  # noqa: PLC0415 - deliberately lazy, see module docstring
    from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415

    from pasta.ns import CLONE_NEWNET, CLONE_NEWUSER, setns  # noqa: PLC0415

    if userns_fd is not None:          # rootless: the user namespace gives the right to enter
        setns(userns_fd, CLONE_NEWUSER)
    setns(netns_fd, CLONE_NEWNET)
    p = NetPlan(**plan_dict)
    done: dict = {"addrs": [], "routes": []}
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")
        if lo:
            ipr.link("set", index=lo[0], state="up")
        if not p.ifname:                    # --splice-only: no tap, only lo
            return done
        found = ipr.link_lookup(ifname=p.ifname)
        if not found:
            raise RuntimeError(f"tap {p.ifname} vanished from the namespace")
        idx = found[0]
        link = {"index": idx, "mtu": p.mtu}
        if p.mac:
            link["address"] = p.mac
        ipr.link("set", **link)
        if p.up:
            ipr.link("set", index=idx, state="up")
            # The kernel's link-local stays tentative (duplicate address detection,
            # after a random delay of up to a second) and unusable meanwhile; in
            # IPv6 local mode it is the only address, and routes via fe80::1 need
            # it.  Like the global addresses, it gets no DAD: put it back "nodad".
            for a in ipr.get_addr(family=10, index=idx, scope=253):
                if a["flags"] & IFA_F_TENTATIVE:
                    ll, plen = a.get_attr("IFA_ADDRESS"), a["prefixlen"]
                    ipr.addr("del", index=idx, address=ll, prefixlen=plen)
                    ipr.addr("add", index=idx, address=ll, prefixlen=plen, flags=IFA_F_NODAD)
        for addr, prefix in p.addrs:
            family = 6 if ":" in addr else 4
            kwargs = {"index": idx, "address": addr, "prefixlen": prefix}
            if family == 6:
                kwargs["flags"] = IFA_F_NODAD
            try:
                ipr.addr("add", **kwargs)
                done["addrs"].append(f"{addr}/{prefix}")
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise RuntimeError(f"cannot add address {addr}/{prefix}: {exc}") from None
        # routes without a gateway first, so that gateways are reachable
        for dst, gw, metric in sorted(p.routes, key=lambda r: r[1] is not None):
            family = 10 if ":" in (gw or dst) else 2
            kwargs = {"oif": idx, "family": family, "proto": 3}   # RTPROT_BOOT, as ip(8)
            if dst != "default":
                net = ipaddress.ip_network(dst, strict=False)
                kwargs.update(dst=str(net.network_address), dst_len=net.prefixlen)
            else:
                kwargs.update(dst="::" if family == 10 else "0.0.0.0", dst_len=0)
            if gw:
                kwargs["gateway"] = gw
            if metric:
                kwargs["priority"] = metric
            try:
                ipr.route("add", **kwargs)
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
