"""The command-line options of passt and pasta, as one table, and the typer CLI built from it.

Names and meanings follow C passt/pasta (see REFERENCE.md), so that podman and
libvirt can run ours unchanged.  Each option says in which modes it exists;
`build_command` turns the table into a typer command for one mode, so both
programs share one definition.  Parsing only collects strings and flags:
validation and meaning live in `conf`.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

VERSION = "0.1.0"

BOTH = ("pasta", "passt")
PASTA = ("pasta",)
PASST = ("passt",)


@dataclass(frozen=True)
class Opt:
    dest: str
    flags: tuple[str, ...]
    kind: str                 # "flag", "value" or "multi" (repeatable value)
    help: str
    modes: tuple[str, ...] = BOTH
    metavar: str | None = None


OPTIONS: tuple[Opt, ...] = (
    # logging and process
    Opt("debug", ("-d", "--debug"), "flag", "Be verbose"),
    Opt("trace", ("--trace",), "flag", "Be extra verbose, show single packets (implies -d)"),
    Opt("quiet", ("-q", "--quiet"), "flag", "Don't print informational messages"),
    Opt("foreground", ("-f", "--foreground"), "flag", "Don't run in background"),
    Opt("stderr", ("-e", "--stderr"), "flag", "Log to standard error too"),
    Opt("log_file", ("-l", "--log-file"), "value", "Log to file PATH", metavar="PATH"),
    Opt("log_size", ("--log-size",), "value", "Maximum log file size, bytes", metavar="SIZE"),
    Opt("runas", ("--runas",), "value", "Run as UID[:GID] (default: nobody if started as root)",
        metavar="UID[:GID]"),
    Opt("pcap", ("-p", "--pcap"), "value", "Capture guest-side frames to FILE (pcap)",
        metavar="FILE"),
    Opt("pid_file", ("-P", "--pid"), "value", "Write own PID to FILE once ready", metavar="FILE"),
    Opt("version", ("--version",), "flag", "Show version and exit"),
    # addressing
    Opt("mtu", ("-m", "--mtu"), "value", "MTU to assign (default 65520)", metavar="MTU"),
    Opt("address", ("-a", "--address"), "multi", "Address to assign (IPv4 and/or IPv6)",
        metavar="ADDR[/PREFIX]"),
    Opt("netmask", ("-n", "--netmask"), "value", "IPv4 netmask (dotted or prefix length)",
        metavar="MASK"),
    Opt("mac_addr", ("-M", "--mac-addr"), "value", "Our MAC address towards the guest",
        metavar="ADDR"),
    Opt("gateway", ("-g", "--gateway"), "multi", "Gateway to advertise (IPv4 and/or IPv6)",
        metavar="ADDR"),
    Opt("interface", ("-i", "--interface"), "value", "Host interface for addresses and routes",
        metavar="NAME"),
    Opt("outbound", ("-o", "--outbound"), "multi", "Source address for outbound sockets",
        metavar="ADDR"),
    Opt("outbound_if4", ("--outbound-if4",), "value", "Bind IPv4 outbound sockets to NAME",
        metavar="NAME"),
    Opt("outbound_if6", ("--outbound-if6",), "value", "Bind IPv6 outbound sockets to NAME",
        metavar="NAME"),
    Opt("ipv4_only", ("-4", "--ipv4-only"), "flag", "IPv4 only"),
    Opt("ipv6_only", ("-6", "--ipv6-only"), "flag", "IPv6 only"),
    Opt("hostname", ("-H", "--hostname"), "value", "Hostname to offer via DHCP", metavar="NAME"),
    Opt("fqdn", ("--fqdn",), "value", "FQDN to offer via DHCP and DHCPv6", metavar="NAME"),
    # DNS
    Opt("dns", ("-D", "--dns"), "multi", "DNS resolver to offer, or 'none'", metavar="ADDR"),
    Opt("search", ("-S", "--search"), "multi", "DNS search list, or 'none'", metavar="LIST"),
    Opt("dns_forward", ("--dns-forward",), "multi",
        "Guest-side address whose DNS queries go to the host's resolver", metavar="ADDR"),
    Opt("dns_host", ("--dns-host",), "multi", "Host resolver for forwarded DNS queries",
        metavar="ADDR"),
    Opt("no_dhcp_dns", ("--no-dhcp-dns",), "flag", "Don't offer DNS resolvers"),
    Opt("no_dhcp_search", ("--no-dhcp-search",), "flag", "Don't offer the search list"),
    Opt("dhcp_dns", ("--dhcp-dns",), "flag", "Offer DNS resolvers (the default)"),
    Opt("dhcp_search", ("--dhcp-search",), "flag", "Offer the search list (the default)"),
    # services
    Opt("no_tcp", ("--no-tcp",), "flag", "Disable TCP"),
    Opt("no_udp", ("--no-udp",), "flag", "Disable UDP"),
    Opt("no_icmp", ("--no-icmp",), "flag", "Disable ICMP/ICMPv6 echo"),
    Opt("no_dhcp", ("--no-dhcp",), "flag", "Disable the DHCP server"),
    Opt("no_ndp", ("--no-ndp",), "flag", "Disable NDP responses"),
    Opt("no_dhcpv6", ("--no-dhcpv6",), "flag", "Disable the DHCPv6 server"),
    Opt("no_ra", ("--no-ra",), "flag", "Disable Router Advertisements"),
    # address mapping
    Opt("no_map_gw", ("--no-map-gw",), "flag", "Don't map the gateway address to the host"),
    Opt("map_gw", ("--map-gw",), "flag", "Map the gateway address to the host (the default)"),
    Opt("map_host_loopback", ("--map-host-loopback",), "multi",
        "Guest-side address that reaches the host's loopback, or 'none'", metavar="ADDR"),
    Opt("map_guest_addr", ("--map-guest-addr",), "multi",
        "Guest-side address that reaches the host's own address", metavar="ADDR"),
    # port forwarding
    Opt("tcp_ports", ("-t", "--tcp-ports"), "multi", "TCP ports to forward to the guest",
        metavar="SPEC"),
    Opt("udp_ports", ("-u", "--udp-ports"), "multi", "UDP ports to forward to the guest",
        metavar="SPEC"),
    Opt("tcp_ns", ("-T", "--tcp-ns"), "multi", "TCP ports to forward from the namespace",
        PASTA, metavar="SPEC"),
    Opt("udp_ns", ("-U", "--udp-ns"), "multi", "UDP ports to forward from the namespace",
        PASTA, metavar="SPEC"),
    # passt only
    Opt("socket", ("-s", "--socket"), "value", "UNIX domain socket path", PASST, metavar="PATH"),
    Opt("one_off", ("-1", "--one-off"), "flag", "Quit after the first guest disconnects", PASST),
    Opt("fd", ("-F", "--fd"), "value", "Use this already-connected socket", PASST, metavar="FD"),
    # pasta only
    Opt("ns_ifname", ("-I", "--ns-ifname"), "value", "Tap interface name in the namespace",
        PASTA, metavar="NAME"),
    Opt("ns_mac_addr", ("--ns-mac-addr",), "value", "MAC address of the namespace interface",
        PASTA, metavar="ADDR"),
    Opt("config_net", ("--config-net",), "flag", "Configure addresses and routes in the namespace",
        PASTA),
    Opt("no_copy_routes", ("--no-copy-routes",), "flag", "Don't copy all host routes", PASTA),
    Opt("no_copy_addrs", ("--no-copy-addrs",), "flag", "Don't copy all host addresses", PASTA),
    Opt("netns", ("--netns",), "value", "Target network namespace, PATH or NAME", PASTA,
        metavar="PATH|NAME"),
    Opt("userns", ("--userns",), "value", "Target user namespace, PATH", PASTA, metavar="PATH"),
    Opt("netns_only", ("--netns-only",), "flag", "Join only the network namespace", PASTA),
    Opt("no_netns_quit", ("--no-netns-quit",), "flag",
        "Keep running when the namespace file goes away", PASTA),
    Opt("no_splice", ("--no-splice",), "flag", "Don't use the loopback splice path", PASTA),
    Opt("host_lo_to_ns_lo", ("--host-lo-to-ns-lo",), "flag",
        "Host loopback traffic reaches the namespace's loopback", PASTA),
)

ANNOTATIONS = {"flag": bool, "value": Optional[str], "multi": Optional[list[str]]}  # noqa: UP045


class UsageError(Exception):
    """A command line that cannot be parsed; the message is one line."""


def build_command(mode: str, handler: Callable[[dict[str, Any]], int]):
    """A click command (built with typer) for `mode`, calling handler(values)."""
    import typer  # noqa: PLC0415 - only the CLI front needs it

    params = []
    for opt in OPTIONS:
        if mode not in opt.modes:
            continue
        default = False if opt.kind == "flag" else None
        params.append(inspect.Parameter(
            opt.dest, inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(default, *opt.flags, help=opt.help, metavar=opt.metavar,
                                 show_default=False),
            annotation=ANNOTATIONS[opt.kind]))
    if mode == "pasta":
        params.append(inspect.Parameter(
            "target", inspect.Parameter.KEYWORD_ONLY,
            default=typer.Argument(None, metavar="[PID | [--] COMMAND [ARG...]]",
                                   show_default=False),
            annotation=Optional[list[str]]))  # noqa: UP045

    def command(**values: Any) -> int:
        return handler(values)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = ("Unprivileged user-mode networking for network namespaces"
                       if mode == "pasta" else
                       "Unprivileged user-mode networking for virtual machines")
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                      rich_markup_mode=None,
                      context_settings={"allow_interspersed_args": False,
                                        "help_option_names": ["-h", "--help"]})
    app.command()(command)
    return typer.main.get_command(app)


def parse_args(mode: str, argv: list[str]) -> dict[str, Any]:
    """Parse argv (without the program name) into a dict of option values.

    Raises UsageError with a one-line message shaped like getopt's, which
    podman matches on (for instance "unrecognized option '--foo'").
    """
    captured: dict[str, Any] = {}

    def keep(values: dict[str, Any]) -> int:
        captured.update(values)
        return 0

    cmd = build_command(mode, keep)
    try:
        rv = cmd.main(list(argv), prog_name=mode, standalone_mode=False)
    except Exception as exc:
        # typer may vendor its own copy of click: recognise its exceptions by shape
        kind = type(exc).__name__
        if kind == "NoSuchOption":
            raise UsageError(f"unrecognized option '{exc.option_name}'") from None
        if kind == "Exit":   # --help or --version handled by click
            raise SystemExit(getattr(exc, "exit_code", 0)) from None
        if kind == "Abort":
            raise SystemExit(1) from None
        if hasattr(exc, "format_message"):
            raise UsageError(exc.format_message().rstrip(".")) from None
        raise
    if not captured and rv is not None:   # --help handled by click itself
        raise SystemExit(0)
    return captured


def main_parse(mode: str, argv: list[str] | None = None) -> dict[str, Any]:
    """parse_args for a program's main(): usage errors exit 1 with one line."""
    try:
        return parse_args(mode, sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"{mode}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def program_main(mode: str, argv: list[str] | None,
                 run: Callable[[dict[str, Any], Any], int]) -> int:
    """The whole of `pasta`/`passt`: parse, --version, run(opts, helper), one-line errors.

    The netlink helper (pyroute2) is forked first so that it loads while we
    parse; it is always closed on the way out.
    """
    from common.conf import ConfigError  # noqa: PLC0415
    from common.helper import Helper, HelperError  # noqa: PLC0415
    from common.process import SetupError  # noqa: PLC0415

    helper = Helper(preload="pyroute2")
    try:
        opts = main_parse(mode, argv)
        if opts.get("version"):
            print(f"{mode} {VERSION} (passt for Python)")
            return 0
        try:
            return run(opts, helper)
        except (SetupError, ConfigError, HelperError) as exc:
            print(f"{mode}: {exc}", file=sys.stderr)
            return 1
    finally:
        helper.close()
