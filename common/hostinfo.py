"""What the host looks like: outbound interfaces, addresses, gateways, routes, DNS.

Discovery of interfaces and routes uses rtnetlink through pyroute2, inside a
short-lived child process (see `helper`), and comes back as plain data:
`HostInfo`.  resolv.conf is parsed here too.  Nothing here decides what the
guest gets; `conf` does that from a `HostInfo` and the command line.
"""

from __future__ import annotations

import ipaddress
import socket
from ipaddress import IPv4Address, IPv6Address

from common.helper import Helper, run_in_child
from common.record import field, record

IPAddress = IPv4Address | IPv6Address


@record(frozen=True)
class HostRoute:
    dst: str                # "default" or a network in CIDR form
    gateway: str | None
    metric: int = 0


@record(frozen=True)
class FamilyInfo:
    """One address family on its template (outbound) interface."""
    ifname: str
    gateway: str | None                       # default gateway, if any
    addrs: tuple[tuple[str, int], ...]        # global addresses with prefix length
    link_local: str | None = None             # IPv6 only
    routes: tuple[HostRoute, ...] = ()


@record(frozen=True)
class HostInfo:
    v4: FamilyInfo | None
    v6: FamilyInfo | None
    macs: dict[str, str] = field(default_factory=dict)   # ifname -> MAC
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()


@record(frozen=True)
class ResolvConf:
    nameservers: tuple[str, ...]
    search: tuple[str, ...]


def parse_resolv_conf(text: str) -> ResolvConf:
    """Nameservers (valid addresses only, order kept) and the search list."""
    servers: list[str] = []
    search: list[str] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if not words:
            continue
        if words[0] == "nameserver" and len(words) > 1:
            addr = words[1].split("%", 1)[0]
            try:
                servers.append(str(ipaddress.ip_address(addr)))
            except ValueError:
                continue
        elif words[0] in ("search", "domain") and len(words) > 1:
            search = [w.rstrip(".") for w in words[1:] if w.strip(".")]
    return ResolvConf(tuple(servers), tuple(search))


def read_resolv_conf(path: str = "/etc/resolv.conf") -> ResolvConf:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_resolv_conf(f.read())
    except OSError:
        return ResolvConf((), ())


IFF_LOOPBACK = 0x8
RTN_UNICAST = 1
RT_TABLE_MAIN = 254


def _oif(route) -> int | None:
    """The output interface of a route: RTA_OIF, or the first hop of a multipath one."""
    oif = route.get_attr("RTA_OIF")
    if oif is None:
        hops = route.get_attr("RTA_MULTIPATH")
        oif = hops[0]["oif"] if hops else None
    return oif


def _discover_netlink(if4: str | None, if6: str | None) -> dict:
    """Runs in the helper child: the only place pyroute2 is imported."""
    from common.rtnl import (  # only in the helper
        RTM_GETADDR,
        RTM_GETLINK,
        RTM_GETROUTE,
        Rtnl,
        ifaddrmsg,
        ifinfmsg,
        rtmsg,
    )

    out: dict = {"macs": {}, "v4": None, "v6": None}
    with Rtnl() as nl:
        names, loopbacks = {}, set()
        for link in nl.dump(ifinfmsg, RTM_GETLINK):
            name = link.get_attr("IFLA_IFNAME")
            names[link["index"]] = name
            if link["flags"] & IFF_LOOPBACK:
                loopbacks.add(link["index"])
            mac = link.get_attr("IFLA_ADDRESS")
            if mac:
                out["macs"][name] = mac
        for family, key, wanted in ((socket.AF_INET, "v4", if4), (socket.AF_INET6, "v6", if6)):
            # unicast routes of the main table, through an interface other than lo,
            # and not to link-local destinations: what can carry the guest's traffic
            usable = [r for r in nl.dump(rtmsg, RTM_GETROUTE, family=family)
                      if (r.get_attr("RTA_TABLE") or r["table"]) == RT_TABLE_MAIN
                      and r["type"] == RTN_UNICAST and _oif(r) not in (None, *loopbacks)
                      and not (r["dst_len"] and
                               ipaddress.ip_address(r.get_attr("RTA_DST")).is_link_local)]
            defaults = sorted((r for r in usable if r["dst_len"] == 0),
                              key=lambda r: r.get_attr("RTA_PRIORITY") or 0)
            if wanted is not None:
                index = next((i for i, n in names.items() if n == wanted), None)
                if index is None:
                    raise ValueError(f"no such interface: {wanted}")
                defaults = [r for r in defaults if _oif(r) == index]
            elif defaults:
                index = _oif(defaults[0])
            elif usable:                # no default route: the first interface with any
                index = _oif(usable[0])
            else:
                continue
            gateway = defaults[0].get_attr("RTA_GATEWAY") if defaults else None
            addrs, link_local = [], None
            for a in nl.dump(ifaddrmsg, RTM_GETADDR, family=family):
                if a["index"] != index:
                    continue
                addr = a.get_attr("IFA_ADDRESS") if family == socket.AF_INET6 else (
                    a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS"))
                if addr is None:
                    continue
                if family == socket.AF_INET6 and ipaddress.ip_address(addr).is_link_local:
                    link_local = link_local or addr
                elif a["scope"] == 0:
                    addrs.append((addr, a["prefixlen"]))
            routes = []
            for r in usable:
                if _oif(r) != index:
                    continue
                dst = r.get_attr("RTA_DST")
                routes.append({
                    "dst": "default" if r["dst_len"] == 0 else f"{dst}/{r['dst_len']}",
                    "gateway": r.get_attr("RTA_GATEWAY"),
                    "metric": r.get_attr("RTA_PRIORITY") or 0,
                })
            out[key] = {"ifname": names[index], "gateway": gateway, "addrs": addrs,
                        "link_local": link_local, "routes": routes}
    return out


def prefetch_netlink(if4: str | None, if6: str | None, helper: Helper) -> None:
    """Start the netlink half of `discover` in `helper` now (same arguments)."""
    helper.prefetch(_discover_netlink, if4, if6)


def discover(if4: str | None = None, if6: str | None = None,
             resolv_conf: str = "/etc/resolv.conf", helper: Helper | None = None) -> HostInfo:
    """Look at the host's interfaces, routes and resolv.conf (netlink in `helper`)."""
    if helper is not None:
        raw = helper.call(_discover_netlink, if4, if6)
    else:
        raw = run_in_child(_discover_netlink, if4, if6)
    fams = {}
    for key in ("v4", "v6"):
        f = raw[key]
        fams[key] = None if f is None else FamilyInfo(
            ifname=f["ifname"], gateway=f["gateway"],
            addrs=tuple((a, p) for a, p in f["addrs"]), link_local=f["link_local"],
            routes=tuple(HostRoute(r["dst"], r["gateway"], r["metric"]) for r in f["routes"]))
    resolv = read_resolv_conf(resolv_conf)
    return HostInfo(v4=fams["v4"], v6=fams["v6"], macs=raw["macs"],
                    nameservers=resolv.nameservers, search=resolv.search)
