"""The command-line options of passt and pasta, as one table, and the parser that reads it.

Names and meanings follow C passt/pasta, so that podman, libvirt, rootlesskit
and QEMU can run ours unchanged.  C passt parses with glibc's getopt_long
(option string "+..."), and callers depend on its behaviour: podman falls back
when stderr says "unrecognized option '--map-guest-addr", users type
unambiguous abbreviations (`--conf` for `--config-net`), and values may be
attached (`--mtu=1500`, `-m1500`) or separate.  `getopt` below does what
getopt_long does, with its error texts:

- a long option is found by its exact name first, else by a unique prefix;
  several prefixes that name the same option are not ambiguous;
- `--name=value`, `--name value`; `-abc` is `-a -b -c`, `-m1500` or `-m 1500`;
- option parsing stops at `--` (dropped) or at the first non-option, which
  for pasta starts the target (PID or command);
- an option may be repeated: "multi" options collect every value in order,
  "value" options keep the last one.

One table serves both programs, as in C passt: an option of the other mode is
recognised (so abbreviations resolve the same way in both) and then refused
with "... is for pasta mode only".  Parsing only collects strings and flags:
validation and meaning live in `conf`.

This module is on the start-up path of both programs (passt must have parsed
its arguments and bound its socket within tens of milliseconds of exec), so
it imports nothing at module level beyond `sys`: the help text is built only
when asked for, and `program_main` imports the rest of the program late.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False   # typing itself costs 2 ms at start-up

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from typing import Any

VERSION = "0.1.0"

BOTH = ("pasta", "passt")
PASTA = ("pasta",)
PASST = ("passt",)


class Opt:
    """One option: where its value goes, how it is spelled, in which modes it exists.

    kind is "flag" (no value), "value" (the last one given wins), "multi"
    (every value, in order) or "ordered": options sharing one dest whose values
    are kept as (long option, value) in command-line order across them (the
    policy rules: --allow, --deny, --allow-dns-name, --policy-file).  `exact`
    options are our own additions, absent from C passt: they match only when
    spelled in full, so that they never make an abbreviation ambiguous that C
    passt accepts.
    """

    __slots__ = ("dest", "flags", "kind", "help", "modes", "metavar", "exact")

    def __init__(self, dest: str, flags: tuple[str, ...], kind: str, help: str,
                 modes: tuple[str, ...] = BOTH, metavar: str | None = None,
                 exact: bool = False) -> None:
        self.dest = dest
        self.flags = flags
        self.kind = kind
        self.help = help
        self.modes = modes
        self.metavar = metavar
        self.exact = exact

    @property
    def takes_value(self) -> bool:
        return self.kind != "flag"

    def __repr__(self) -> str:
        return f"Opt({self.dest!r}, {self.flags!r})"


OPTIONS: tuple[Opt, ...] = (
    # logging and process
    Opt("debug", ("-d", "--debug"), "flag", "Be verbose"),
    Opt("trace", ("--trace",), "flag", "Be extra verbose, show single packets (implies -d)"),
    Opt("stats", ("--stats",), "value",
        "Print event counters, at most every DELAY seconds (needs -f)", metavar="DELAY"),
    Opt("quiet", ("-q", "--quiet"), "flag", "Don't print informational messages"),
    Opt("foreground", ("-f", "--foreground"), "flag", "Don't run in background"),
    Opt("stderr", ("-e", "--stderr"), "flag", "Log to standard error too"),
    Opt("log_file", ("-l", "--log-file"), "value", "Log to file PATH", metavar="PATH"),
    Opt("log_size", ("--log-size",), "value", "Maximum log file size, bytes", metavar="SIZE"),
    Opt("runas", ("--runas",), "value", "Run as UID[:GID] (default: nobody if started as root)",
        metavar="UID[:GID]"),
    Opt("conf_path", ("-c", "--conf-path"), "value",
        "Control socket for run-time forwarding changes (pesto(1))", metavar="PATH"),
    Opt("chroot_fallback", ("--chroot-fallback",), "flag",
        "If an empty root can't be made with pivot_root, fall back to chroot"),
    Opt("pcap", ("-p", "--pcap"), "value", "Capture guest-side frames to FILE (pcap)",
        metavar="FILE"),
    Opt("pid_file", ("-P", "--pid"), "value", "Write own PID to FILE once ready", metavar="FILE"),
    Opt("help", ("-h", "--help"), "flag", "Show this help and exit"),
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
    # offered by default in passt, only when asked for in pasta (as C passt/pasta)
    Opt("no_dhcp_dns", ("--no-dhcp-dns",), "flag",
        "Don't offer DNS resolvers (DHCP, DHCPv6, NDP)", PASST),
    Opt("no_dhcp_search", ("--no-dhcp-search",), "flag",
        "Don't offer the search list (DHCP, DHCPv6, NDP)", PASST),
    Opt("dhcp_dns", ("--dhcp-dns",), "flag", "Offer DNS resolvers (DHCP, DHCPv6, NDP)", PASTA),
    Opt("dhcp_search", ("--dhcp-search",), "flag", "Offer the search list (DHCP, DHCPv6, NDP)",
        PASTA),
    # services
    Opt("no_tcp", ("--no-tcp",), "flag", "Disable TCP"),
    Opt("no_udp", ("--no-udp",), "flag", "Disable UDP"),
    Opt("no_icmp", ("--no-icmp",), "flag", "Disable ICMP/ICMPv6 echo"),
    Opt("no_dhcp", ("--no-dhcp",), "flag", "Disable the DHCP server"),
    Opt("no_ndp", ("--no-ndp",), "flag", "Disable NDP responses"),
    Opt("no_dhcpv6", ("--no-dhcpv6",), "flag", "Disable the DHCPv6 server"),
    Opt("no_ra", ("--no-ra",), "flag", "Disable Router Advertisements"),
    Opt("freebind", ("--freebind",), "flag",
        "Forwarded ports may bind addresses the host does not have (yet)"),
    # address mapping
    Opt("no_map_gw", ("--no-map-gw",), "flag", "Don't map the gateway address to the host"),
    Opt("map_gw", ("--map-gw",), "flag", "Map the gateway address to the host (the default)",
        exact=True),
    Opt("map_host_loopback", ("--map-host-loopback",), "multi",
        "Guest-side address that reaches the host's loopback, or 'none'", metavar="ADDR"),
    Opt("map_guest_addr", ("--map-guest-addr",), "multi",
        "Guest-side address that reaches the host's own address, or 'none'", metavar="ADDR"),
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
    Opt("socket", ("-s", "--socket", "--socket-path"), "value", "UNIX domain socket path",
        PASST, metavar="PATH"),
    Opt("one_off", ("-1", "--one-off"), "flag", "Quit after the first guest disconnects", PASST),
    Opt("fd", ("-F", "--fd"), "value", "Use this already-connected socket", PASST, metavar="FD"),
    Opt("vhost_user", ("--vhost-user",), "flag", "Serve the guest over vhost-user (shared memory)",
        PASST),
    Opt("print_capabilities", ("--print-capabilities",), "flag",
        "Print the vhost-user back-end capabilities (JSON) and exit", PASST),
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
    Opt("splice_only", ("--splice-only",), "flag",
        "No tap device: only forward between loopback addresses", PASTA),
    Opt("host_lo_to_ns_lo", ("--host-lo-to-ns-lo",), "flag",
        "Host loopback traffic reaches the namespace's loopback", PASTA),
    # egress policy and flow log (ours, beyond C passt: spelled in full only)
    Opt("policy", ("--allow",), "ordered",
        "Allow new flows to [tcp:|udp:|icmp:]ADDR[:PORTS] (first match wins)",
        metavar="SPEC", exact=True),
    Opt("policy", ("--deny",), "ordered", "Deny new flows to SPEC", metavar="SPEC",
        exact=True),
    Opt("policy", ("--allow-dns-name",), "ordered",
        "Allow the addresses DNS answers give for NAME, while their TTL lasts",
        metavar="[PROTO:]NAME[:PORTS]", exact=True),
    Opt("policy", ("--policy-file",), "ordered", "Policy rules from FILE, one a line",
        metavar="FILE", exact=True),
    Opt("policy_default", ("--policy-default",), "value",
        "What no rule matches gets: allow (the default) or deny", metavar="allow|deny",
        exact=True),
    Opt("deny_action", ("--deny-action",), "value",
        "Refuse denied flows with reset/ICMP (the default) or drop them silently",
        metavar="reset|drop", exact=True),
    Opt("policy_inbound", ("--policy-inbound",), "flag",
        "Apply the policy to forwarded ports (inbound) too", exact=True),
    Opt("flow_log", ("--flow-log",), "value",
        "Log flows opening and closing to PATH as JSON lines (- for stderr)",
        metavar="PATH", exact=True),
    Opt("flow_log_size", ("--flow-log-size",), "value",
        "Maximum flow log size, bytes (default 1 MiB)", metavar="SIZE", exact=True),
)

# "If conflicting or multiple options are given, the last one takes effect"
# (passt(1)): giving the key clears the options listed.
CLEARS = {
    "ipv4_only": ("ipv6_only",), "ipv6_only": ("ipv4_only",),
    "debug": ("quiet",), "trace": ("quiet",), "quiet": ("debug", "trace"),
    "map_gw": ("no_map_gw",), "no_map_gw": ("map_gw",),
    "netns_only": ("userns",), "userns": ("netns_only",),
}

# Options that end parsing where they stand, as in C passt: `pasta --version
# --bogus` prints the version.
STOPPERS = ("help", "version")

USAGE = {
    "pasta": ("[OPTION]... [COMMAND] [ARGS]...", "[OPTION]... PID",
              "[OPTION]... --netns PATH|NAME"),
    "passt": ("[OPTION]...",),
    "pesto": ("[OPTION]... PATH",),
}
SUMMARY = {
    "pasta": "Unprivileged user-mode networking for network namespaces.\n"
             "Without PID or --netns, run COMMAND (default: a shell) in a new user and\n"
             "network namespace connected by pasta.",
    "passt": "Unprivileged user-mode networking for virtual machines.",
    "pesto": "Show and change the port forwarding and the egress policy of a running\n"
             "pasta or passt, through the control socket PATH it made for -c PATH.",
}


class UsageError(Exception):
    """A command line that cannot be parsed; the message is one line."""


def getopt(argv: Sequence[str], table: Sequence[Opt], *, mode: str | None = None,
           stop: Sequence[str] = ()) -> tuple[list[tuple[Opt, str | None]], list[str]]:
    """getopt_long over `table`, in "+" (require order) mode.

    Returns the options found, in order, as (option, value or None), and the
    operands left after them.  An option whose `modes` lack `mode` is refused
    once found; an option whose dest is in `stop` ends parsing where it stands.
    Raises UsageError with getopt's own message.
    """
    shorts: dict[str, Opt] = {}
    longs: list[tuple[str, Opt]] = []
    for opt in table:
        for flag in opt.flags:
            if flag.startswith("--"):
                longs.append((flag[2:], opt))
            else:
                shorts[flag[1]] = opt

    found: list[tuple[Opt, str | None]] = []
    i, n = 0, len(argv)
    while i < n:
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        i += 1
        if arg.startswith("--"):
            opt, full, value, i = _long(arg, argv, i, longs)
            _check_mode(opt, f"--{full}", mode)
            found.append((opt, value))
            if opt.dest in stop:
                return found, []
            continue
        pos = 1
        while pos < len(arg):
            ch = arg[pos]
            pos += 1
            opt = shorts.get(ch)
            if opt is None:
                raise UsageError(f"invalid option -- '{ch}'")
            value = None
            if opt.takes_value:
                if pos < len(arg):
                    value = arg[pos:]
                elif i < n:
                    value = argv[i]
                    i += 1
                else:
                    raise UsageError(f"option requires an argument -- '{ch}'")
                pos = len(arg)
            _check_mode(opt, f"-{ch}", mode)
            found.append((opt, value))
            if opt.dest in stop:
                return found, []
    return found, list(argv[i:])


def _long(arg: str, argv: Sequence[str], i: int,
          longs: list[tuple[str, Opt]]) -> tuple[Opt, str, str | None, int]:
    """For `arg` ("--name[=value]"): the option, its full name, its value, the next index."""
    name, eq, attached = arg[2:].partition("=")
    exact = [(spelled, o) for spelled, o in longs if spelled == name]
    matches = exact or [(spelled, o) for spelled, o in longs
                        if spelled.startswith(name) and not o.exact]
    if not matches:
        raise UsageError(f"unrecognized option '{arg}'")
    full, opt = matches[0]
    # getopt compares each later match with the first one only
    odd = [spelled for spelled, o in matches[1:] if o is not opt]
    if odd:
        names = " ".join(f"'--{s}'" for s in [full, *odd])
        raise UsageError(f"option '{arg}' is ambiguous; possibilities: {names}")
    if eq:
        if not opt.takes_value:
            raise UsageError(f"option '--{full}' doesn't allow an argument")
        return opt, full, attached, i
    if not opt.takes_value:
        return opt, full, None, i
    if i >= len(argv):
        raise UsageError(f"option '--{full}' requires an argument")
    return opt, full, argv[i], i + 1


def _check_mode(opt: Opt, spelled: str, mode: str | None) -> None:
    if mode is not None and mode not in opt.modes:
        raise UsageError(f"{spelled} is for {' / '.join(opt.modes)} mode only")


def parse_args(mode: str, argv: Sequence[str]) -> dict[str, Any]:
    """Parse argv (without the program name) into a dict of option values.

    Every option of the table has a key: flags are False, values None and
    multi options None unless given; of conflicting options
    (CLEARS) only the last one given is set.  For pasta, "target" holds the operands
    (PID or command); passt takes none.  Raises UsageError with a one-line
    message shaped like getopt's, which podman matches on.
    """
    values: dict[str, Any] = {o.dest: (False if o.kind == "flag" else None) for o in OPTIONS}
    found, rest = getopt(argv, OPTIONS, mode=mode, stop=STOPPERS)
    for opt, value in found:
        for other in CLEARS.get(opt.dest, ()):
            values[other] = None if other == "userns" else False
        if opt.kind == "flag":
            values[opt.dest] = True
        elif opt.kind == "value":
            values[opt.dest] = value
        else:
            if values[opt.dest] is None:
                values[opt.dest] = []
            values[opt.dest].append((opt.flags[-1], value) if opt.kind == "ordered"
                                    else value)
    if mode == "pasta":
        values["target"] = rest
    elif rest:
        raise UsageError(f"extra non-option argument: {rest[0]}")
    return values


def render_help(mode: str, table: Sequence[Opt] = OPTIONS) -> str:
    """The --help text of `mode`, from the table."""
    import textwrap  # only --help needs it

    lines = [f"Usage: {mode} {u}" if k == 0 else f"       {mode} {u}"
             for k, u in enumerate(USAGE.get(mode, ("[OPTION]...",)))]
    if mode in SUMMARY:
        lines += ["", SUMMARY[mode]]
    lines.append("")
    for opt in table:
        if mode not in opt.modes:
            continue
        shorts = [f for f in opt.flags if not f.startswith("--")]
        longs = [f for f in opt.flags if f.startswith("--")]
        spelled = ", ".join(shorts + longs) if shorts else "    " + ", ".join(longs)
        if opt.metavar:
            spelled += f" {opt.metavar}"
        left = f"  {spelled}"
        wrapped = textwrap.wrap(opt.help, 79 - 32) or [""]
        if len(left) > 30:
            lines.append(left)
            lines += [" " * 32 + w for w in wrapped]
        else:
            lines.append(f"{left:<32}{wrapped[0]}")
            lines += [" " * 32 + w for w in wrapped[1:]]
    return "\n".join(lines) + "\n"


def main_parse(mode: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """parse_args for a program's main(): usage errors exit 1 with one line,
    --help prints the help and exits 0."""
    try:
        opts = parse_args(mode, sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        from common import report

        report.error(mode, str(exc))
        raise SystemExit(1) from None
    if opts["help"]:
        sys.stdout.write(render_help(mode))
        raise SystemExit(0)
    return opts


def program_main(mode: str, argv: Sequence[str] | None,
                 run: Callable[[dict[str, Any], Any], int],
                 early: Callable[[dict[str, Any]], Iterable[int] | None] | None = None,
                 helper_modules: Sequence[str] = ()) -> int:
    """The whole of `pasta`/`passt`: parse, --version, early(opts), run(opts, helper),
    one-line errors (common.report: stderr, the log file, syslog).

    `early` is what must happen within milliseconds of exec, before anything
    slow is imported (passt binds its socket there); it returns the descriptors
    it made, which survive the closing of inherited ones.  Then the netlink helper
    (pyroute2) is forked, so that it loads while we import the rest (and
    `helper_modules`, those of the functions we will ask it to run); it is
    always closed on the way out.
    """
    from common import phases, report

    report.std_fds()          # so that nothing we open lands on 0-2 (a closed stdin, say)
    report.protect_stderr()
    opts = main_parse(mode, argv)
    phases.mark("parsed")
    if opts.get("version"):
        print(f"{mode} {VERSION} (passt for Python)")
        return 0
    log_file = opts.get("log_file")
    kept: tuple[int, ...] = ()
    if early is not None:
        try:
            kept = tuple(early(opts) or ())
        except report.SetupError as exc:
            report.error(mode, str(exc), log_file)
            return 1
    # only now, as importing the sandbox costs tens of milliseconds that `early` can't
    # wait for: not dumpable, nothing inherited but -F and what `early` made
    from common.sandbox_start import at_start, fd_from_argv

    given_fd = fd_from_argv(sys.argv[1:] if argv is None else argv,
                            [(o.flags, o.kind != "flag") for o in OPTIONS if mode in o.modes])
    at_start(keep=kept if given_fd is None else (*kept, given_fd))
    phases.mark("sandbox at start")
    from common.helper import Helper

    # pyroute2's package __init__ imports the whole library (ndb, ipdb, ...: 0.15 s);
    # the helper loads only the modules we use, and starts now, so that it has done
    # so by the time we ask it anything
    helper = Helper(preload=("common.rtnl", *helper_modules), bypass_init=("pyroute2",))
    phases.mark("helper forked")
    from common.conf import ConfigError
    from common.helper import HelperError
    try:
        try:
            code = run(opts, helper)
        except (report.SetupError, ConfigError, HelperError) as exc:
            report.error(mode, str(exc), log_file)
            code = 1
    finally:
        helper.close()
    if argv is None:
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """Exit the program without the interpreter's teardown of every module and
    object (15-20 ms that `pasta -- CMD` would add to CMD's run): everything we
    opened is closed by now; what is left to do is flush what was written."""
    import logging
    import os

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
