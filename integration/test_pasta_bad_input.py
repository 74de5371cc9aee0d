"""Bad input: one line on stderr naming the cause, a non-zero exit, nothing left behind.

"Nothing left behind" is checked, not assumed: no pid file, no new entry in
/run/netns, no process still carrying the run's unique pid-file path on its
command line, and no tap in a target namespace.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from integration.conftest import as_user, run


def leftovers(marker: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(f"{pid}: {cmdline!r}")
    return found


# namespaces other test runs on this machine make and remove meanwhile: conftest's
# unique() names (with the pid of their pytest), the guest fixtures', podman's and the
# sandbox tests'.  Only entries that appear count: what others remove is theirs.
_OTHERS = re.compile(r"^(pt-[a-z]+(\d+)x\d+|passt-guest-.*|podman-.*|sbx.*)$")


def run_netns() -> set[str]:
    """/run/netns, without the entries of concurrent test runs."""
    mine = str(os.getpid() % 100000)
    return {n for n in os.listdir("/run/netns")
            if not ((m := _OTHERS.match(n)) and m.group(2) != mine)}


def left_in_run_netns(before: set[str]) -> set[str]:
    return run_netns() - before


CASES = [
    # (id, arguments, expected words in the one line)
    ("unknown option", ["--bogus"], "unrecognized option '--bogus'"),
    ("unknown short option", ["-x"], "invalid option -- 'x'"),
    ("missing value", ["--mtu"], "requires an argument"),
    ("bad address", ["-a", "10.0.0.300"], "invalid address: 10.0.0.300"),
    ("bad prefix", ["-a", "10.0.0.1/33"], "invalid prefix length: 10.0.0.1/33"),
    ("bad IPv6 prefix", ["-a", "fd00::1/129"], "invalid prefix length"),
    ("bad netmask", ["-n", "255.0.255.0"], "invalid netmask"),
    ("bad gateway", ["-g", "1.2.3"], "invalid gateway: 1.2.3"),
    ("bad DNS", ["-D", "dns.example"], "invalid DNS address"),
    ("bad MTU", ["-m", "70000"], "invalid MTU: 70000"),
    ("bad MAC", ["-M", "zz:11:22:33:44:55"], "invalid MAC address"),
    ("bad ns MAC", ["--ns-mac-addr", "01:02:03"], "invalid MAC address"),
    ("bad port spec", ["-t", "99999"], "99999"),
    ("bad runas", ["--runas", "no-such-user-xyz"], "no-such-user-xyz"),
    ("missing netns", ["--netns", "/run/netns/does-not-exist-xyz"], "does not exist"),
    ("missing netns name", ["--netns", "does-not-exist-xyz"], "does not exist"),
    ("not a netns", ["--netns", "/etc/hostname"], "not a network namespace"),
    ("no such PID", ["4194303"], "no process with PID 4194303"),
    ("PID and netns", ["--netns", "x", "1234"], "can't be given with a PID"),
]


def test_unwritable_pid_file(topo, pasta, tmp_path):
    r = topo.host.run(*pasta, "--config-net", "-P", str(tmp_path / "no" / "such" / "dir.pid"),
                      "--", "true", check=False)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write pid file" in lines[0], r.stderr


@pytest.mark.parametrize("args,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(topo, pasta, tmp_path, args, expected):
    pidfile = tmp_path / "marker.pid"
    before = run_netns()
    r = topo.host.run(*pasta, "-P", str(pidfile), *args, check=False, timeout=30)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("pasta: ") and expected in lines[0], lines[0]
    assert not pidfile.exists()
    assert left_in_run_netns(before) == set()
    assert leftovers(str(pidfile)) == []


def test_no_permission_for_netns(topo, pasta, tmp_path, test_user):
    """An unprivileged user may not enter a namespace root made."""
    uid, gid = test_user
    target = topo.target()
    tmp_path.chmod(0o777)
    pidfile = tmp_path / "marker.pid"
    r = topo.host.run(*as_user(uid, gid, [*pasta, "-P", str(pidfile), "--netns", target.path]),
                      check=False, timeout=30)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pasta: " in lines[0], r.stderr
    assert "permission" in lines[0].lower() or "not permitted" in lines[0].lower(), lines[0]
    assert not pidfile.exists()
    assert leftovers(str(pidfile)) == []
    assert target.run("ip", "link", "show", "eth0", check=False).returncode != 0


def test_tap_name_taken(topo, pasta, tmp_path):
    """Set-up fails after daemonising: the parent still reports it, and no tap stays."""
    target = topo.target()
    target.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    pidfile = tmp_path / "marker.pid"
    r = topo.host.run(*pasta, "-P", str(pidfile), "--config-net", "--netns", target.name,
                      check=False, timeout=30)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "eth0" in lines[0], r.stderr
    assert not pidfile.exists()
    assert leftovers(str(pidfile)) == []
    assert "veth" in run(target.cmd("ip", "-d", "link", "show", "eth0")).stdout
