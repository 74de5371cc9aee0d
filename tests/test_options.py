"""The command-line parser behaves as glibc's getopt_long does for C passt.

Error texts are compared with Debian's C pasta/passt (installed by
tools/test.sh) for the same argv: each case fails inside getopt, so the C
program exits before it sets anything up.  Podman matches "unrecognized
option '--map-guest-addr" in that text.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.options import OPTIONS, Opt, UsageError, getopt, parse_args, render_help

ROOT = Path(__file__).resolve().parent.parent


def error(mode: str, argv: list[str]) -> str:
    with pytest.raises(UsageError) as exc:
        parse_args(mode, argv)
    return str(exc.value)


def c_error(mode: str, argv: list[str]) -> str:
    """The getopt line C pasta/passt prints for argv, without the program name."""
    r = subprocess.run([f"/usr/bin/{mode}", "-f", *argv], capture_output=True, text=True,
                       timeout=20, stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith(f"/usr/bin/{mode}: "))
    return line.split(": ", 1)[1]


def same(ours: str, theirs: str) -> bool:
    """Equal, except that the possibilities of an ambiguous option may come in another order."""
    if "possibilities:" in ours and "possibilities:" in theirs:
        (a, _, x), (b, _, y) = ours.partition(":"), theirs.partition(":")
        return a == b and sorted(x.split()) == sorted(y.split())
    return ours == theirs


C_CASES = [
    ["--bogus"],
    ["--bogus=1"],
    ["--map-guest-address-of-nothing", "x"],
    ["-X"],
    ["-dX"],
    ["-d", "-e4", "-Z"],
    ["-m"],
    ["-d", "-m"],
    ["--mtu"],
    ["--mt"],
    ["--trace=1"],
    ["--no-dhcp-dns=1"],
    ["--ipv4=1"],
    ["--no-d"],
    ["--net=x"],
    ["--net"],
    ["-m", "1500", "--bogus"],
]


@pytest.mark.parametrize("mode", ["pasta", "passt"])
@pytest.mark.parametrize("argv", C_CASES, ids=[" ".join(c) for c in C_CASES])
def test_errors_match_c_getopt(mode, argv):
    ours, theirs = error(mode, ["-f", *argv]), c_error(mode, argv)
    assert same(ours, theirs), (ours, theirs)


def test_program_prints_one_line_and_exits_1():
    r = subprocess.run([sys.executable, "-c", "import sys; from pasta.cli import main; "
                        "sys.exit(main(['--map-guest-addr-x', '1']))"],
                       capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode == 1
    assert r.stderr == "pasta: unrecognized option '--map-guest-addr-x'\n"


@pytest.mark.parametrize("argv, expected", [
    (["--mtu=1500"], {"mtu": "1500"}),
    (["--mtu", "1500"], {"mtu": "1500"}),
    (["-m1500"], {"mtu": "1500"}),
    (["-m", "1500"], {"mtu": "1500"}),
    (["--mtu="], {"mtu": ""}),
    (["--mtu", "-1"], {"mtu": "-1"}),                 # a value is taken as it is
    (["--mtu", "--"], {"mtu": "--"}),
    (["-m", "1500", "-m", "9000"], {"mtu": "9000"}),  # the last one wins
    (["-dfe"], {"debug": True, "foreground": True, "stderr": True}),
    # conflicting options: the last one takes effect (passt(1))
    (["-dq"], {"quiet": True}),
    (["-q", "--trace"], {"trace": True}),
    (["-4", "-6"], {"ipv6_only": True}),
    (["-6", "-4"], {"ipv4_only": True}),
    (["--no-map-gw", "--map-gw"], {"map_gw": True}),
    (["--userns", "/u", "--netns-only"], {"netns_only": True}),
    (["--netns-only", "--userns", "/u"], {"userns": "/u"}),
    (["--stats", "5", "--freeb", "--splice-o", "--chroot-f"],
     {"stats": "5", "freebind": True, "splice_only": True, "chroot_fallback": True}),
    (["-dfm9000"], {"debug": True, "foreground": True, "mtu": "9000"}),
    (["-dfm", "9000"], {"debug": True, "foreground": True, "mtu": "9000"}),
    (["--deb", "--fore"], {"debug": True, "foreground": True}),
    (["--tr"], {"trace": True}),
    (["--config"], {"config_net": True}),
    (["--map-g", "none"], {"map_guest_addr": ["none"]}),   # --map-gw is ours: no rival
    (["--map-gw"], {"map_gw": True}),
    (["-t", "auto", "-t", "18082", "--tcp-ports=80", "--tcp-p", "90"],
     {"tcp_ports": ["auto", "18082", "80", "90"]}),
    (["-a", "10.0.0.2", "-a", "fd00::2"], {"address": ["10.0.0.2", "fd00::2"]}),
])
def test_values(argv, expected):
    got = parse_args("pasta", argv)
    given = {k: v for k, v in got.items() if v not in (None, False, [])}
    assert given == expected


@pytest.mark.parametrize("argv, target", [
    (["--config-net", "--", "sh", "-c", "exit 3"], ["sh", "-c", "exit 3"]),
    (["--config-net", "sh", "-c", "exit 3"], ["sh", "-c", "exit 3"]),   # stops at "sh"
    (["-d", "1234"], ["1234"]),
    (["-d", "1234", "-f"], ["1234", "-f"]),            # nothing after the target is ours
    (["--", "--config-net"], ["--config-net"]),
    (["-", "x"], ["-", "x"]),
    (["--", "--", "x"], ["--", "x"]),
    (["-d"], []),
    ([], []),
])
def test_pasta_target(argv, target):
    assert parse_args("pasta", argv)["target"] == target


def test_passt_takes_no_operand():
    assert error("passt", ["-f", "x"]) == "extra non-option argument: x"
    assert error("passt", ["--", "x"]) == "extra non-option argument: x"
    assert "target" not in parse_args("passt", ["-f"])


@pytest.mark.parametrize("mode, argv, message", [
    # as C passt 2026 says it: one option table, refused by mode once found
    ("passt", ["-T", "22"], "-T is for pasta mode only"),
    ("passt", ["--tcp-ns", "22"], "--tcp-ns is for pasta mode only"),
    ("passt", ["--netns", "x"], "--netns is for pasta mode only"),
    ("passt", ["--no-netns-q"], "--no-netns-quit is for pasta mode only"),
    ("passt", ["--splice-only"], "--splice-only is for pasta mode only"),
    ("pasta", ["-1"], "-1 is for passt mode only"),
    ("pasta", ["--one"], "--one-off is for passt mode only"),
    ("pasta", ["-s", "/tmp/x"], "-s is for passt mode only"),
])
def test_mode_and_ambiguity(mode, argv, message):
    assert error(mode, argv) == message


def test_help_and_version_end_parsing_where_they_stand():
    assert parse_args("pasta", ["--version", "--bogus"])["version"] is True
    assert parse_args("passt", ["-h", "-X"])["help"] is True
    assert error("pasta", ["-X", "--version"]) == "invalid option -- 'X'"


def test_same_option_by_two_names_is_not_ambiguous():
    table = (Opt("sock", ("-s", "--socket", "--socket-path"), "value", ""),
             Opt("stats", ("--stats",), "value", ""),
             Opt("so", ("--so-other",), "flag", ""))
    assert getopt(["--socket-p", "x"], table)[0] == [(table[0], "x")]
    assert getopt(["--socke", "x"], table)[0] == [(table[0], "x")]
    with pytest.raises(UsageError, match="possibilities: '--socket' '--so-other'$"):
        getopt(["--so"], table)


def test_every_option_is_spelled_once():
    spelled = [f for o in OPTIONS for f in o.flags]
    assert len(spelled) == len(set(spelled))
    assert all(len(f) == 2 for f in spelled if not f.startswith("--"))


@pytest.mark.parametrize("mode", ["pasta", "passt"])
def test_help_lists_the_mode_options(mode):
    text = render_help(mode)
    assert text.startswith(f"Usage: {mode} [OPTION]...")
    assert ("--netns PATH|NAME" in text) == (mode == "pasta")
    assert ("--socket, --socket-path PATH" in text) == (mode == "passt")
    assert "-h, --help" in text
    r = subprocess.run([sys.executable, "-c", f"import sys; from {mode}.cli import main; "
                        "sys.exit(main(['--help']))"],
                       capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode == 0 and r.stdout == text and r.stderr == ""


def test_parse_path_imports_nothing_heavy():
    """passt must parse and bind within tens of ms: no typer, click, pyroute2, dataclasses."""
    code = ("import sys; before = set(sys.modules); import common.options as o; "
            "o.parse_args('passt', ['-f', '-s', '/tmp/x', '-t', '22']); "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    # __future__ (a few hundred µs) comes with `from __future__ import annotations`;
    # site had usually imported it already, but not in every install
    assert set(r.stdout.split()) <= {"__future__", "common", "common.options"}, r.stdout
