"""The one immutable `Config`: what the guest gets and how we behave.

Built once, from the parsed command line (`options`) and what the host looks
like (`hostinfo`).  Every module receives the parts it needs from it; nothing
else reads `sys.argv`, the environment or resolv.conf.  Errors are `ConfigError`
with a one-line message naming the offending value.

Defaults follow C passt/pasta: the guest gets the host's address, prefix and
gateway on the outbound interface (the one with the default route, else the
first with any route), MTU 65520, the host's resolvers, and the gateway
address maps to the host's loopback.  With no such interface for a family,
"local mode": 169.254.2.1/16 via 169.254.2.2 for IPv4, no address via fe80::1
for IPv6.
"""

from __future__ import annotations

import grp
import ipaddress
import pwd
import socket
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface

from common.fwd import NONE as FWD_NONE
from common.fwd import ForwardSpec, forward_config
from common.helper import Helper
from common.hostinfo import HostInfo, HostRoute, discover, prefetch_netlink
from common.policy import DEFAULTS, DENY_ACTIONS, PolicyConfig, PolicyError, parse_cli
from common.record import field, record

TYPE_CHECKING = False   # typing itself costs 2-5 ms at start-up
if TYPE_CHECKING:
    from typing import Any

MTU_DEFAULT = 65520
MTU_MIN = 68
MTU_MAX = 65520
LOG_SIZE_DEFAULT = 1 << 20
# the MAC we use when the host gives us none to copy (C passt uses the same)
MAC_FALLBACK = bytes.fromhex("9a559a559a55")
# local mode, with no host interface to copy (passt(1), "Local mode for disconnected setups")
LOCAL4_ADDR = IPv4Address("169.254.2.1")
LOCAL4_GW = IPv4Address("169.254.2.2")
LOCAL4_PREFIX = 16
LOCAL6_GW = IPv6Address("fe80::1")


class ConfigError(Exception):
    """The configuration cannot be built; the message is one line."""


@record(frozen=True)
class Ip4Config:
    addr: IPv4Address                    # the guest's address (default: the host's)
    prefix_len: int
    gateway: IPv4Address | None          # router offered to the guest
    our_addr: IPv4Address                # what we answer as: DHCP server id, ARP source
    dns: tuple[IPv4Address, ...]         # resolvers offered to the guest
    dns_forward: IPv4Address | None      # guest-side address whose DNS we forward
    dns_host: IPv4Address | None         # where forwarded DNS queries go on the host
    map_host_loopback: IPv4Address | None  # guest-side address for the host's 127.0.0.1
    map_guest_addr: IPv4Address | None   # guest-side address for the host's own address
    outbound: IPv4Address | None         # -o: source address for host sockets
    outbound_if: str | None              # --outbound-if4
    host_ifname: str | None              # template interface on the host
    host_addrs: tuple[IPv4Interface, ...] = ()   # host addresses (for --config-net)
    host_routes: tuple[HostRoute, ...] = ()

    @property
    def network(self) -> ipaddress.IPv4Network:
        return IPv4Interface((self.addr, self.prefix_len)).network


@record(frozen=True)
class Ip6Config:
    addr: IPv6Address | None             # the guest's global address (default: the host's);
                                         # None in local mode: only its link-local
    prefix_len: int
    gateway: IPv6Address | None          # the host's gateway (maps to host loopback)
    our_ll: IPv6Address                  # our link-local: source of NDP, RA and DHCPv6
    dns: tuple[IPv6Address, ...]
    dns_forward: IPv6Address | None
    dns_host: IPv6Address | None
    map_host_loopback: IPv6Address | None
    map_guest_addr: IPv6Address | None
    outbound: IPv6Address | None
    outbound_if: str | None
    host_ifname: str | None
    host_addrs: tuple[IPv6Interface, ...] = ()
    host_routes: tuple[HostRoute, ...] = ()

    @property
    def prefix(self) -> ipaddress.IPv6Network | None:
        """The /64 around the guest's address, advertised for SLAAC (which needs a /64)."""
        return None if self.addr is None else IPv6Interface((self.addr, 64)).network


@record(frozen=True)
class Services:
    tcp: bool = True
    udp: bool = True
    icmp: bool = True
    dhcp: bool = True
    ndp: bool = True
    dhcpv6: bool = True
    ra: bool = True


@record(frozen=True)
class LogConfig:
    debug: bool = False
    trace: bool = False
    quiet: bool = False
    stderr: bool = False
    file: str | None = None
    size: int = LOG_SIZE_DEFAULT


@record(frozen=True)
class ProcessConfig:
    foreground: bool = False
    pid_file: str | None = None
    runas: tuple[int, int] | None = None   # explicit --runas
    control: str | None = None             # -c: the control socket's path (pesto(1))
    chroot_fallback: bool = False          # --chroot-fallback: for the sandbox (issue 10)


@record(frozen=True)
class Config:
    mtu: int
    our_mac: bytes                       # source MAC of everything we send to the guest
    ip4: Ip4Config | None
    ip6: Ip6Config | None
    search: tuple[str, ...] = ()
    hostname: str | None = None
    fqdn: str | None = None
    offer_dns: bool = True               # DHCP/RA/DHCPv6 carry resolvers
    offer_search: bool = True            # ... and the search list
    services: Services = field(default_factory=Services)
    tcp_in: ForwardSpec = FWD_NONE       # host -> guest (-t)
    udp_in: ForwardSpec = FWD_NONE       # host -> guest (-u)
    tcp_out: ForwardSpec = FWD_NONE      # namespace -> host (-T, pasta)
    udp_out: ForwardSpec = FWD_NONE      # namespace -> host (-U, pasta)
    pcap: str | None = None
    log: LogConfig = field(default_factory=LogConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    notes: tuple[str, ...] = ()          # what discovery left out, said at start-up
    freebind: bool = False               # --freebind: forwarded ports bind any address
    splice_only: bool = False            # --splice-only (pasta): no tap, loopback only
    stats: int = 0                       # --stats DELAY: event counters every DELAY s
    policy: PolicyConfig = field(default_factory=PolicyConfig)   # egress policy, flow log


# ---------------------------------------------------------------- value parsers


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    try:
        if len(parts) != 6 or any(len(p) not in (1, 2) for p in parts):
            raise ValueError
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ConfigError(f"invalid MAC address: {text}") from None


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_addr(text: str, what: str = "address") -> IPv4Address | IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"invalid {what}: {text}") from None


def parse_addr_prefix(text: str) -> tuple[IPv4Address | IPv6Address, int | None]:
    addr_text, _, prefix_text = text.partition("/")
    addr = parse_addr(addr_text)
    if not prefix_text:
        return addr, None
    limit = 32 if addr.version == 4 else 128
    if not prefix_text.isdigit() or not 0 <= int(prefix_text) <= limit:
        raise ConfigError(f"invalid prefix length: {text}")
    return addr, int(prefix_text)


def parse_netmask(text: str) -> int:
    if text.isdigit():
        bits = int(text)
        if 0 <= bits <= 32:
            return bits
        raise ConfigError(f"invalid netmask: {text}")
    try:
        return ipaddress.IPv4Network(f"0.0.0.0/{text}").prefixlen
    except ValueError:
        raise ConfigError(f"invalid netmask: {text}") from None


def parse_int(text: str, what: str, low: int, high: int) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise ConfigError(f"invalid {what}: {text}") from None
    if not low <= value <= high:
        raise ConfigError(f"invalid {what}: {text} (allowed {low}-{high})")
    return value


def parse_runas(text: str) -> tuple[int, int]:
    user, _, group = text.partition(":")
    try:
        if user.isdigit():
            uid = int(user)
            gid = pwd.getpwuid(uid).pw_gid if not group else None
        else:
            entry = pwd.getpwnam(user)
            uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError:
        if user.isdigit() and group:
            uid, gid = int(user), None
        elif user.isdigit():
            return int(user), int(user)
        else:
            raise ConfigError(f"invalid --runas user: {user}") from None
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"invalid --runas group: {group}") from None
    return uid, gid if gid is not None else uid


def classful_prefix(addr: IPv4Address) -> int:
    """RFC 4632 fallback when no host address gives a prefix."""
    first = int(addr) >> 24
    return 8 if first < 128 else 16 if first < 192 else 24


# ---------------------------------------------------------------- building


def _split_by_family(values: list[str] | None, what: str) -> tuple[list, list]:
    v4, v6 = [], []
    for text in values or []:
        addr = parse_addr(text, what)
        (v4 if addr.version == 4 else v6).append(addr)
    return v4, v6


def _last(values: list):
    """Of several values for one address family, the last one takes effect (passt(1))."""
    return values[-1] if values else None


def _nat(values: list[str] | None, what: str) -> tuple:
    """--map-host-loopback / --map-guest-addr, in order: an address sets its family,
    "none" clears both.  "default" stands for a family never mentioned."""
    v4: IPv4Address | None | str = "default"
    v6: IPv6Address | None | str = "default"
    for text in values or []:
        if text == "none":
            v4 = v6 = None
            continue
        addr = parse_addr(text, f"{what} address")
        if addr.is_unspecified or addr.is_loopback or addr.is_multicast:
            raise ConfigError(f"invalid {what} address: {text}")
        if addr.version == 4:
            v4 = addr
        else:
            v6 = addr
    return v4, v6


def _template_ifaces(opts: dict[str, Any]) -> tuple[str | None, str | None]:
    iface = opts.get("interface")      # the template; else --outbound-if4/6 (pasta(1))
    return iface or opts.get("outbound_if4"), iface or opts.get("outbound_if6")


def start_host_discovery(opts: dict[str, Any], helper: Helper) -> None:
    """Have `helper` look at the host now, while we do other things: `host_config`
    collects the answer."""
    prefetch_netlink(*_template_ifaces(opts), helper=helper)


def host_config(mode: str, opts: dict[str, Any], helper: Helper) -> Config:
    """The Config for `mode`: the host as netlink shows it (asked of `helper`), and `opts`."""
    host = discover(*_template_ifaces(opts), helper=helper)
    try:
        return build_config(mode, opts, host, forward_parser=forward_config)
    except ValueError as exc:       # fwd.SpecError
        raise ConfigError(str(exc)) from None


def build_config(mode: str, opts: dict[str, Any], host: HostInfo,
                 forward_parser=None) -> Config:
    """The Config for `mode` ("pasta" or "passt") from parsed options and the host."""
    notes: list[str] = []
    mtu = parse_int(opts["mtu"], "MTU", MTU_MIN, MTU_MAX) if opts.get("mtu") else MTU_DEFAULT
    if opts.get("ipv4_only") and opts.get("ipv6_only"):
        raise ConfigError("options -4 and -6 are mutually exclusive")

    addrs4, addrs6 = [], []
    prefix4 = prefix6 = None
    for text in opts.get("address") or []:
        addr, prefix = parse_addr_prefix(text)
        if addr.version == 4:
            addrs4.append(addr)
            prefix4 = prefix if prefix is not None else prefix4
        else:
            addrs6.append(addr)
            prefix6 = prefix if prefix is not None else prefix6
    addr4, addr6 = _last(addrs4), _last(addrs6)
    if opts.get("netmask"):
        prefix4 = parse_netmask(opts["netmask"])
    gw4s, gw6s = _split_by_family(opts.get("gateway"), "gateway")
    gw4_opt, gw6_opt = _last(gw4s), _last(gw6s)
    out4s, out6s = _split_by_family(opts.get("outbound"), "outbound address")
    fwd4s, fwd6s = _split_by_family(opts.get("dns_forward"), "--dns-forward address")
    dnshost4s, dnshost6s = _split_by_family(opts.get("dns_host"), "--dns-host address")
    guest4, guest6_map = _nat(opts.get("map_guest_addr"), "--map-guest-addr")
    guest4 = None if guest4 == "default" else guest4
    guest6_map = None if guest6_map == "default" else guest6_map

    map_lo4, map_lo6 = _nat(opts.get("map_host_loopback"), "--map-host-loopback")
    if opts.get("no_map_gw"):        # an address given for a family still counts
        map_lo4 = None if map_lo4 == "default" else map_lo4
        map_lo6 = None if map_lo6 == "default" else map_lo6

    # resolvers: -D overrides resolv.conf; "none" means no resolvers at all
    dns_texts = opts.get("dns")
    if dns_texts:
        wanted = [] if "none" in dns_texts else dns_texts
        dns4, dns6 = _split_by_family(wanted, "DNS address")
    else:
        dns4, dns6 = _split_by_family(list(host.nameservers), "DNS address")
    host_dns4 = [a for a in _split_by_family(list(host.nameservers), "DNS")[0]]
    host_dns6 = [a for a in _split_by_family(list(host.nameservers), "DNS")[1]]

    search_texts = opts.get("search")
    if search_texts:
        words = " ".join(search_texts).split()
        search = () if words == ["none"] else tuple(w.rstrip(".") for w in words)
    else:
        search = host.search

    mac = parse_mac(opts["mac_addr"]) if opts.get("mac_addr") else None
    # --splice-only (pasta): no tap, so no addresses, routes or services for a guest
    splice_only = mode == "pasta" and bool(opts.get("splice_only"))
    if splice_only and opts.get("no_splice"):
        raise ConfigError("--splice-only is incompatible with --no-splice")
    if opts.get("host_lo_to_ns_lo") and opts.get("no_splice"):
        raise ConfigError("--host-lo-to-ns-lo is incompatible with --no-splice")

    # IPv4: the template is the host interface found by `hostinfo` (default route,
    # else the first with any route), if it has an address; else local mode.
    ip4 = None
    fam = host.v4
    tmpl = fam if fam is not None and fam.addrs else None
    if not opts.get("ipv6_only") and not splice_only:
        if tmpl is None:
            notes.append("IPv4: " + (f"no address on {fam.ifname}" if fam else
                                     "no host interface with a route") + ", local mode")
        guest = addr4 or (IPv4Address(tmpl.addrs[0][0]) if tmpl else LOCAL4_ADDR)
        if prefix4 is None:
            match = [p for a, p in (tmpl.addrs if tmpl else ()) if IPv4Address(a) == guest]
            prefix4 = (match[0] if match else tmpl.addrs[0][1] if tmpl and addr4 is None
                       else LOCAL4_PREFIX if addr4 is None else classful_prefix(guest))
        gateway = gw4_opt or (
            (IPv4Address(tmpl.gateway) if tmpl.gateway else None) if tmpl else LOCAL4_GW)
        if gateway is None:
            notes.append("IPv4: no default gateway on the host, none offered")
        net = IPv4Interface((guest, prefix4)).network
        our = gateway
        if our is None or our == guest:
            our = next((h for h in net.hosts() if h != guest), guest)
        map_lo = gateway if map_lo4 == "default" else map_lo4
        dns_fwd = _last(fwd4s)
        ip4 = Ip4Config(
            addr=guest, prefix_len=prefix4, gateway=gateway, our_addr=our,
            dns=_offered_dns(dns4, dns_fwd, map_lo), dns_forward=dns_fwd,
            dns_host=_last(dnshost4s) or (host_dns4[0] if host_dns4 else None),
            map_host_loopback=map_lo, map_guest_addr=guest4,
            outbound=_last(out4s),
            outbound_if=opts.get("outbound_if4"),
            host_ifname=tmpl.ifname if tmpl else None,
            host_addrs=tuple(IPv4Interface((a, p)) for a, p in (tmpl.addrs if tmpl else ())),
            host_routes=tmpl.routes if tmpl else ())
        if mac is None and tmpl is not None:
            mac = _host_mac(host, tmpl.ifname)

    # IPv6: as IPv4; local mode assigns no address (the guest keeps its link-local)
    # and routes through fe80::1.
    ip6 = None
    fam = host.v6
    tmpl = fam if fam is not None and fam.addrs else None
    if not opts.get("ipv4_only") and not splice_only:
        if tmpl is None:
            notes.append("IPv6: " + (f"no global address on {fam.ifname}" if fam else
                                     "no host interface with a route") + ", local mode")
        guest6 = addr6 or (IPv6Address(tmpl.addrs[0][0]) if tmpl else None)
        if prefix6 is None:
            match = [p for a, p in (tmpl.addrs if tmpl else ()) if IPv6Address(a) == guest6]
            prefix6 = match[0] if match else 64
        gateway = gw6_opt or (
            (IPv6Address(tmpl.gateway) if tmpl.gateway else None) if tmpl else LOCAL6_GW)
        our_ll = IPv6Address(tmpl.link_local) if tmpl and tmpl.link_local else (
            gateway if gateway is not None and gateway.is_link_local else LOCAL6_GW)
        map_lo = gateway if map_lo6 == "default" else map_lo6
        dns_fwd = _last(fwd6s)
        ip6 = Ip6Config(
            addr=guest6, prefix_len=prefix6, gateway=gateway, our_ll=our_ll,
            dns=_offered_dns(dns6, dns_fwd, map_lo), dns_forward=dns_fwd,
            dns_host=_last(dnshost6s) or (host_dns6[0] if host_dns6 else None),
            map_host_loopback=map_lo, map_guest_addr=guest6_map,
            outbound=_last(out6s),
            outbound_if=opts.get("outbound_if6"),
            host_ifname=tmpl.ifname if tmpl else None,
            host_addrs=tuple(IPv6Interface((a, p)) for a, p in (tmpl.addrs if tmpl else ())),
            host_routes=tmpl.routes if tmpl else ())
        if mac is None and tmpl is not None:
            mac = _host_mac(host, tmpl.ifname)

    log_size = (parse_int(opts["log_size"], "log size", 4096, 1 << 40)
                if opts.get("log_size") else LOG_SIZE_DEFAULT)
    services = Services(
        tcp=not opts.get("no_tcp"), udp=not opts.get("no_udp"), icmp=not opts.get("no_icmp"),
        dhcp=not opts.get("no_dhcp") and ip4 is not None,
        ndp=not opts.get("no_ndp") and ip6 is not None,
        dhcpv6=not opts.get("no_dhcpv6") and ip6 is not None and ip6.addr is not None,
        # --config-net configures the namespace itself: no RA, so no SLAAC address
        # beside the copied one (C pasta does the same)
        ra=not opts.get("no_ra") and not opts.get("no_ndp") and ip6 is not None
        and not opts.get("config_net"))

    fwd = {}
    if forward_parser is not None:
        families = tuple(v for v, c in ((4, ip4), (6, ip6)) if c is not None) or (
            (4,) if opts.get("ipv4_only") else (6,) if opts.get("ipv6_only") else (4, 6))
        fwd = forward_parser(mode, opts, services, families=families)

    return Config(
        mtu=mtu,
        our_mac=mac or MAC_FALLBACK,
        ip4=ip4, ip6=ip6,
        search=search,
        hostname=opts.get("hostname"),
        fqdn=opts.get("fqdn"),
        # pasta: the namespace keeps its own resolv.conf unless asked; passt: offered
        offer_dns=bool(opts.get("dhcp_dns")) if mode == "pasta" else not opts.get("no_dhcp_dns"),
        offer_search=(bool(opts.get("dhcp_search")) if mode == "pasta"
                      else not opts.get("no_dhcp_search")),
        services=services,
        tcp_in=fwd.get("tcp_in", FWD_NONE), udp_in=fwd.get("udp_in", FWD_NONE),
        tcp_out=fwd.get("tcp_out", FWD_NONE), udp_out=fwd.get("udp_out", FWD_NONE),
        pcap=opts.get("pcap"),
        log=LogConfig(debug=bool(opts.get("debug") or opts.get("trace")),
                      trace=bool(opts.get("trace")), quiet=bool(opts.get("quiet")),
                      stderr=bool(opts.get("stderr")), file=opts.get("log_file"),
                      size=log_size),
        process=ProcessConfig(foreground=bool(opts.get("foreground")),
                              pid_file=opts.get("pid_file"),
                              runas=parse_runas(opts["runas"]) if opts.get("runas") else None,
                              control=opts.get("conf_path") or None,
                              chroot_fallback=bool(opts.get("chroot_fallback"))),
        freebind=bool(opts.get("freebind")),
        splice_only=splice_only,
        stats=_stats_delay(mode, opts),
        policy=policy_config(mode, opts),
        notes=tuple(notes),
    )


def resolve_host(name: str) -> list[str]:
    """A host name's addresses, as the host's resolver gives them (start-up only)."""
    infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read(1 << 20)


def policy_config(mode: str, opts: dict[str, Any], resolve=resolve_host) -> PolicyConfig:
    """--allow/--deny/--allow-dns-name/--policy-file (in order), --policy-default,
    --deny-action, --policy-inbound, --flow-log and --flow-log-size.  Host names in
    rules are resolved here, once."""
    try:
        rules, file_default = parse_cli(opts.get("policy") or (), resolve, _read_text)
    except PolicyError as exc:
        raise ConfigError(str(exc)) from None
    default = opts.get("policy_default")
    if default is not None and default not in DEFAULTS:
        raise ConfigError(f"--policy-default {_show(default)}: expected allow or deny")
    action = opts.get("deny_action") or "reset"
    if action not in DENY_ACTIONS:
        raise ConfigError(f"--deny-action {_show(action)}: expected reset or drop")
    flow_log = opts.get("flow_log") or None
    if flow_log == "-" and not _stderr_stays(mode, opts):
        raise ConfigError("--flow-log - needs --foreground: the records go to standard error")
    size = (parse_int(opts["flow_log_size"], "flow log size", 4096, 1 << 40)
            if opts.get("flow_log_size") else LOG_SIZE_DEFAULT)
    return PolicyConfig(rules=tuple(rules), default=default or file_default or "allow",
                        deny_action=action, inbound=bool(opts.get("policy_inbound")),
                        flow_log=flow_log, flow_log_size=size)


def _show(text: str) -> str:
    return repr(text) if not text.isprintable() else f"'{text[:40]}'"


def _stats_delay(mode: str, opts: dict[str, Any]) -> int:
    """--stats DELAY: counters go to stderr, so there must be one (-f, or a pasta command)."""
    text = opts.get("stats")
    if text is None:
        return 0
    delay = parse_int(text, "--stats delay", 0, 86400)
    if delay and not _stderr_stays(mode, opts):
        raise ConfigError("--stats needs --foreground: the counters go to standard error")
    return delay


def _stderr_stays(mode: str, opts: dict[str, Any]) -> bool:
    """Standard error stays ours after start-up: -f, or pasta running a command."""
    target = opts.get("target") or []
    command = mode == "pasta" and not opts.get("netns") and not (
        len(target) == 1 and target[0].isdigit())
    return bool(opts.get("foreground")) or command


def _offered_dns(resolvers: list, dns_forward, map_loopback) -> tuple:
    """The resolvers DHCP/NDP/DHCPv6 offer: the forward address when forwarding, else the
    resolvers, a loopback one (systemd-resolved, dnsmasq) reached through the mapping."""
    if dns_forward is not None:
        return (dns_forward,)
    offered = [map_loopback if a.is_loopback else a for a in resolvers
               if not a.is_loopback or map_loopback is not None]
    return tuple(dict.fromkeys(offered))


def _host_mac(host: HostInfo, ifname: str) -> bytes | None:
    text = host.macs.get(ifname)
    if not text:
        return None
    mac = bytes.fromhex(text.replace(":", ""))
    return mac if len(mac) == 6 and any(mac) else None


def describe(conf: Config) -> list[str]:
    """Human summary printed at start-up (like C pasta's)."""
    lines = [f"MAC: {format_mac(conf.our_mac)}", f"MTU: {conf.mtu}"]
    if conf.ip4:
        c = conf.ip4
        lines += [f"DHCP: assign {c.addr}/{c.prefix_len}, router {c.gateway or '-'}"]
        if c.dns and conf.offer_dns:
            lines.append("    DNS: " + ", ".join(map(str, c.dns)))
    if conf.ip6:
        c = conf.ip6
        assign = f"assign {c.addr}/{c.prefix_len}" if c.addr else "no address (local mode)"
        lines += [f"NDP/DHCPv6: {assign}, router {c.gateway or '-'}, "
                  f"our link-local {c.our_ll}"]
        if c.dns and conf.offer_dns:
            lines.append("    DNS: " + ", ".join(map(str, c.dns)))
    if conf.search and conf.offer_search:
        lines.append("    search: " + " ".join(conf.search))
    return lines
