"""Seeing through wrappers to the programs a test's command line starts
(integration/programs.py), so that each can be checked against tools/test.sh."""

from __future__ import annotations

import pytest

from integration.programs import _dep_names, programs_of, shell_programs


@pytest.mark.parametrize("argv, programs", [
    (["ip", "netns", "exec", "pt-h1", "ping", "-c", "1", "10.0.0.1"], ["ip", "ping"]),
    (["ip", "-j", "addr"], ["ip"]),
    (["setpriv", "--reuid=999", "--regid=995", "--clear-groups", "--", "nsenter", "-t", "42",
      "--user", "--mount", "--", "socat", "-", "TCP:x:1"], ["setpriv", "nsenter", "socat"]),
    (["nsenter", "-t", "42", "-n", "tc", "qdisc"], ["nsenter", "tc"]),
    (["unshare", "--mount", "--propagation", "private", "sh", "-c",
      'mount --bind "$0" /tmp && exec "$@"', "/x"], ["unshare", "sh", "mount"]),
    (["env", "A=1", "-u", "B", "busybox", "udhcpc"], ["env", "busybox"]),
    (["timeout", "-s", "KILL", "5", "iperf3", "-c", "x"], ["timeout", "iperf3"]),
    (["/opt/p/bin/pasta", "--config-net", "-t", "80", "--", "curl", "x"],
     ["/opt/p/bin/pasta", "curl"]),
    (["/opt/p/bin/pasta", "--config-net", "1234"], ["/opt/p/bin/pasta"]),
    (["prlimit", "--nofile=64", "dhclient", "-6"], ["prlimit", "dhclient"]),
])
def test_programs_of(argv, programs):
    assert programs_of(argv) == programs


@pytest.mark.parametrize("script, programs", [
    ("exit 7", []),
    ("kill -TERM $$", []),
    ("id -u; ip -j addr show eth0; exit 5", ["id", "ip"]),
    ("ulimit -n 20000; exec /usr/bin/python3 flood.py client", ["/usr/bin/python3"]),
    ("umount -l /x && rm /x", ["umount", "rm"]),
    ("A=1 B=2 tshark -r f 2>/dev/null | grep x >> out", ["tshark", "grep"]),
    ("if ping -c1 x; then echo ok; else wget -q -O- y; fi", ["ping", "wget"]),
    ("for i in 1 2 3; do sleep 1; done", ["sleep"]),
    ("mkdir -m 0700 /r/netns && touch /r/n && unshare --net=/r/n true && exec sleep 600",
     ["mkdir", "touch", "unshare", "true", "sleep"]),
    ("echo 'a; b' \"c && d\"\nsocat - x", ["socat"]),
    ('"$SHELL" -c x', []),
])
def test_shell_programs(script, programs):
    assert shell_programs(script) == programs


def test_dependency_fields():
    assert _dep_names("libc6 (>= 2.34), perl:any | awk, foo [amd64]") == [
        ["libc6"], ["perl", "awk"], ["foo"]]
    assert _dep_names("") == []
