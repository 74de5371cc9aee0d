"""`pesto`: show and change the port forwarding of a running pasta or passt.

    pesto [OPTION]... PATH

PATH is the control socket that pasta/passt made for `-c PATH`.  The command
line is C pesto's: `-t/-u/-T/-U SPEC` name forwards; without `-A`/`-D` they
replace their table (HOST: -t/-u, SPLICE: -T/-U), after `-A` they are added,
after `-D` deleted; `-C TABLE` clears one; the options apply in order, and
the whole of it succeeds or changes nothing.  With no change, the tables are
printed.  Ours beyond C pesto: `--flows` lists the live flows, `--json`
prints the server's replies as they are (one JSON object per line),
`--show-policy` prints the egress policy with its counters, and `--policy
FILE` replaces it with the rules of FILE (`-`: standard input), all or
nothing.  pesto reads FILE and resolves its host names itself (the server,
sandboxed, can do neither), checks every rule, and sends the text with the
addresses; the server checks it again.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Sequence

from common.options import VERSION, Opt, UsageError, getopt, render_help
from common.policy import PolicyError, parse_policy_text

PESTO = "pesto"
OPTIONS: tuple[Opt, ...] = (
    Opt("debug", ("-d", "--debug"), "flag", "Print the requests and replies", (PESTO,)),
    Opt("help", ("-h", "--help"), "flag", "Show this help and exit", (PESTO,)),
    Opt("show", ("-s", "--show"), "flag", "Show the tables before and after the changes",
        (PESTO,)),
    Opt("add", ("-A", "--add"), "flag", "The specs that follow are added", (PESTO,)),
    Opt("delete", ("-D", "--delete"), "flag", "The specs that follow are deleted", (PESTO,)),
    Opt("clear", ("-C", "--clear"), "multi", "Clear table TABLE (HOST or SPLICE)", (PESTO,),
        metavar="TABLE"),
    Opt("tcp_ports", ("-t", "--tcp-ports"), "multi", "TCP ports forwarded to the guest",
        (PESTO,), metavar="SPEC"),
    Opt("udp_ports", ("-u", "--udp-ports"), "multi", "UDP ports forwarded to the guest",
        (PESTO,), metavar="SPEC"),
    Opt("tcp_ns", ("-T", "--tcp-ns"), "multi", "TCP ports forwarded from the namespace",
        (PESTO,), metavar="SPEC"),
    Opt("udp_ns", ("-U", "--udp-ns"), "multi", "UDP ports forwarded from the namespace",
        (PESTO,), metavar="SPEC"),
    Opt("flows", ("--flows",), "flag", "List the live flows", (PESTO,)),
    Opt("json", ("--json",), "flag", "Print the replies as JSON", (PESTO,)),
    Opt("policy", ("--policy",), "value",
        "Replace the egress policy with the rules of FILE (- for standard input)",
        (PESTO,), metavar="FILE"),
    Opt("show_policy", ("--show-policy",), "flag",
        "Show the egress policy and its counters", (PESTO,)),
    Opt("version", ("--version",), "flag", "Show version and exit", (PESTO,)),
)
SPEC_OPTIONS = {"tcp_ports": "-t", "udp_ports": "-u", "tcp_ns": "-T", "udp_ns": "-U"}
TABLE_OF = {"-t": "HOST", "-u": "HOST", "-T": "SPLICE", "-U": "SPLICE"}
REPLY_MAX = 16 << 20
TIMEOUT = 10.0


class PestoError(Exception):
    """A failure to report in one line."""


def build_ops(found: Sequence[tuple[Opt, str | None]]) -> list[dict]:
    """The ops of the change request, from the options in order (C pesto's rules)."""
    ops: list[dict] = []
    how = "replace"
    cleared: set[str] = set()
    for opt, value in found:
        if opt.dest == "add":
            how = "add"
        elif opt.dest == "delete":
            how = "delete"
        elif opt.dest == "clear":
            ops.append({"op": "clear", "table": value})
        elif opt.dest in SPEC_OPTIONS:
            option = SPEC_OPTIONS[opt.dest]
            if how == "replace":
                table = TABLE_OF[option]
                if table not in cleared:
                    cleared.add(table)
                    ops.append({"op": "clear", "table": table})
                ops.append({"op": "add", "option": option, "spec": value})
            else:
                ops.append({"op": how, "option": option, "spec": value})
    return ops


def request(path: str, ops: list[dict], debug: bool = False) -> dict:
    """Send one request, return the reply (which may say ok: false)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(TIMEOUT)
    try:
        try:
            s.connect(path)
        except OSError as exc:
            raise PestoError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        f = s.makefile("rb")
        hello = _line(f, path)
        if debug:
            print(f"< {json.dumps(hello)}", file=sys.stderr)
        if hello.get("protocol") != "passt-py-control" or hello.get("version") != 1:
            raise PestoError(f"{path}: not a control socket we speak to ({hello})")
        message = {"version": 1, "ops": ops}
        if debug:
            print(f"> {json.dumps(message)}", file=sys.stderr)
        s.sendall(json.dumps(message).encode() + b"\n")
        reply = _line(f, path)
        if debug:
            print(f"< {json.dumps(reply)}", file=sys.stderr)
        return reply
    except TimeoutError:
        raise PestoError(f"{path}: no answer within {TIMEOUT:.0f} s") from None
    finally:
        s.close()


def _line(f, path: str) -> dict:
    data = f.readline(REPLY_MAX)
    if not data.endswith(b"\n"):
        raise PestoError(f"{path}: connection closed" if not data else f"{path}: reply too long")
    try:
        out = json.loads(data)
    except ValueError:
        raise PestoError(f"{path}: malformed reply") from None
    if not isinstance(out, dict):
        raise PestoError(f"{path}: malformed reply")
    return out


def format_tables(tables: dict) -> str:
    lines = []
    for name in ("HOST", "SPLICE"):
        if name not in tables:
            continue
        options = "-t/-u" if name == "HOST" else "-T/-U"
        lines.append(f"{name} ({options}):")
        rules = [f"    {proto.upper()} {r}" for proto in ("tcp", "udp")
                 for r in tables[name].get(proto, [])]
        lines += rules or ["    (none)"]
    return "\n".join(lines)


def format_flows(flows: list[dict]) -> str:
    head = ("PROTO", "PATH", "DIR", "GUEST", "HOST", "TO GUEST", "FROM GUEST", "AGE", "ID",
            "RULE")
    rows = [head]
    for f in flows:
        rows.append((f["proto"], f["path"], "in" if f["inbound"] else "out", f["guest"],
                     f["host"], _num(f["to_guest"]), _num(f["from_guest"]),
                     "-" if f["age"] is None else f"{f['age']:.1f}s", _num(f.get("id")),
                     f.get("rule") or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _num(v) -> str:
    return "-" if v is None else str(v)


def format_policy(p: dict | None) -> str:
    if p is None:
        return "no egress policy here"
    lines = [f"policy: default {p['default']}, denied flows "
             f"{'refused' if p['deny_action'] == 'reset' else 'dropped'}, forwarded ports "
             f"{'checked' if p['inbound'] else 'not checked'}"]
    width = max([len(str(r["flows"])) for r in p["rules"]] + [5])
    lines.append(f"    {'#':>4}  {'FLOWS':>{width}}  RULE")
    for r in p["rules"]:
        lines.append(f"    {r['n']:>4}  {r['flows']:>{width}}  {r['rule']}")
    lines.append(f"    {'-':>4}  {p['dns_forward_flows']:>{width}}  (DNS to --dns-forward)")
    lines.append(f"    {'-':>4}  {p['default_flows']:>{width}}  default {p['default']}")
    if p.get("learned"):
        lines.append("learned from DNS answers:")
        for e in p["learned"]:
            lines.append(f"    {e['addr']}  {e['name']}  rule {e['rule']}, "
                         f"{e['expires_in']:.0f} s left")
    return "\n".join(lines)


def resolve_host(name: str) -> list[str]:
    infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def policy_op(path: str, resolve=resolve_host) -> dict:
    """The `policy` op replacing the policy with FILE's rules, checked here first."""
    source = "standard input" if path == "-" else f"policy file {path}"
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read(1 << 20)
    except OSError as exc:
        raise PestoError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise PestoError(f"{path}: not UTF-8 text") from None
    resolved: dict[str, list[str]] = {}

    def recording(name: str) -> list[str]:
        resolved[name] = resolve(name)
        return resolved[name]
    try:
        parse_policy_text(text, source, recording)
    except PolicyError as exc:
        raise PestoError(str(exc)) from None
    return {"op": "policy", "text": text, "source": source, "resolved": resolved}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        found, rest = getopt(args, OPTIONS, stop=("help", "version"))
    except UsageError as exc:
        print(f"pesto: {exc}", file=sys.stderr)
        return 1
    given = {opt.dest for opt, _ in found}
    if "help" in given:
        sys.stdout.write(render_help(PESTO, OPTIONS))
        return 0
    if "version" in given:
        print(f"pesto {VERSION} (passt for Python)")
        return 0
    if len(rest) != 1:
        print("pesto: " + ("missing control socket PATH" if not rest
                           else f"extra non-option argument: {rest[1]}"), file=sys.stderr)
        return 1
    path = rest[0]
    debug, as_json = "debug" in given, "json" in given
    ops = build_ops(found)
    policy_file = next((v for o, v in found if o.dest == "policy"), None)
    try:
        if "show" in given and ops:
            _print(request(path, [{"op": "show"}], debug), as_json, "before")
        if policy_file is not None:
            ops.append(policy_op(policy_file))
        elif "show_policy" in given:
            ops.append({"op": "policy"})
        if "flows" in given:
            ops.append({"op": "flows"})
        reply = request(path, ops, debug)
    except PestoError as exc:
        print(f"pesto: {exc}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        if as_json:
            print(json.dumps(reply))
        print(f"pesto: {reply.get('error', 'request refused')}", file=sys.stderr)
        return 1
    changed = any(op["op"] in ("add", "delete", "clear") for op in ops)
    if as_json:
        print(json.dumps(reply))
    elif "flows" in given:
        print(format_flows(reply.get("flows", [])))
    elif any(op["op"] == "policy" for op in ops):
        print(format_policy(reply.get("policy")))
    elif not changed or "show" in given:
        _print(reply, False, "after" if changed else None)
    return 0


def _print(reply: dict, as_json: bool, label: str | None) -> None:
    if as_json:
        print(json.dumps(reply))
        return
    if label:
        print(f"{label}:")
    print(format_tables(reply.get("tables", {})))


if __name__ == "__main__":
    sys.exit(main())
