"""The namespace configures itself from pasta: DHCP (busybox udhcpc), SLAAC, DHCPv6 (dhclient).

pasta serves a test-made namespace without --config-net; real clients inside
it must get exactly what the host has (or what the options say).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from integration.conftest import (
    DNS4,
    DNS6,
    GW4,
    HOST4,
    HOST6,
    SEARCH,
    add_side_link,
    run,
    wait_for,
)

UDHCPC_SCRIPT = """#!/bin/sh
# busybox udhcpc hook: record what the lease carried
[ "$1" = bound ] || exit 0
{
  echo "ip=$ip"; echo "subnet=$subnet"; echo "router=$router"; echo "dns=$dns"
  echo "search=$search"; echo "domain=$domain"; echo "mtu=$mtu"; echo "lease=$lease"
  echo "serverid=$serverid"; echo "hostname=$hostname"
} > "$LEASE_OUT"
"""


def start_pasta(topo, procs, pasta, *extra):
    target = topo.target()
    p = procs.start(topo.host.cmd(*pasta, "-f", "--netns", target.name, *extra))
    wait_for(lambda: p.poll() is not None or
             target.run("ip", "link", "show", "eth0", check=False).returncode == 0,
             what="tap in namespace")
    assert p.poll() is None, p.stderr.read()
    target.run("ip", "link", "set", "eth0", "up")
    return target, p


def udhcpc(target, tmp_path: Path) -> dict[str, str]:
    script = tmp_path / "udhcpc.sh"
    script.write_text(UDHCPC_SCRIPT)
    script.chmod(0o755)
    out = tmp_path / "lease.txt"
    r = run(target.cmd("env", f"LEASE_OUT={out}", "busybox", "udhcpc", "-i", "eth0", "-f",
                       "-q", "-n", "-t", "4", "-T", "1", "-s", str(script),
                       "-O", "search", "-O", "mtu", "-O", "hostname"),
            check=False, timeout=20)
    assert r.returncode == 0, r.stdout + r.stderr
    return dict(line.split("=", 1) for line in out.read_text().splitlines())


def test_dhcp_defaults(topo, procs, pasta, tmp_path):
    """No resolvers and no search list unless asked: the namespace keeps its own
    resolv.conf (as C pasta; podman writes one)."""
    target, _ = start_pasta(topo, procs, pasta)
    lease = udhcpc(target, tmp_path)
    assert lease["ip"] == HOST4
    assert lease["subnet"] == "255.255.255.0"
    assert lease["router"] == GW4
    assert lease["dns"] == "" and lease["search"] == ""
    assert lease["mtu"] == "65520"
    assert lease["serverid"] == GW4


def test_dhcp_dns_and_search_when_asked(topo, procs, pasta, tmp_path):
    target, _ = start_pasta(topo, procs, pasta, "--dhcp-dns", "--dhcp-search")
    lease = udhcpc(target, tmp_path)
    assert lease["ip"] == HOST4
    assert lease["dns"].split() == [DNS4]
    assert lease["search"].split() == list(SEARCH)


def test_dhcp_dns_and_search_options(topo, procs, pasta, tmp_path):
    target, _ = start_pasta(topo, procs, pasta, "--dhcp-dns", "--dhcp-search",
                            "-D", "10.77.0.99", "-D", "10.77.0.98",
                            "-S", "one.test two.test", "-m", "1500", "-H", "guesthost")
    lease = udhcpc(target, tmp_path)
    assert lease["dns"].split() == ["10.77.0.99", "10.77.0.98"]
    assert lease["search"].split() == ["one.test", "two.test"]
    assert lease["mtu"] == "1500"
    assert lease["hostname"] == "guesthost"


def test_dhcp_address_netmask_gateway(topo, procs, pasta, tmp_path):
    target, _ = start_pasta(topo, procs, pasta, "-a", "192.168.50.7", "-n", "16",
                            "-g", "192.168.0.1")
    lease = udhcpc(target, tmp_path)
    assert lease["ip"] == "192.168.50.7"
    assert lease["subnet"] == "255.255.0.0"
    assert lease["router"] == "192.168.0.1"


def test_dhcp_none_dns(topo, procs, pasta, tmp_path):
    target, _ = start_pasta(topo, procs, pasta, "--dhcp-dns", "--dhcp-search",
                            "-D", "none", "-S", "none")
    lease = udhcpc(target, tmp_path)
    assert lease["dns"] == "" and lease["search"] == ""


def test_slaac_and_default_route(topo, procs, pasta):
    target, _ = start_pasta(topo, procs, pasta)

    def slaac():
        addrs = json.loads(target.run("ip", "-j", "-6", "addr", "show", "dev", "eth0").stdout)
        found = [a for a in addrs[0]["addr_info"]
                 if a.get("scope") == "global" and a.get("local", "").startswith("fd77::")
                 and a.get("dynamic") and not a.get("tentative")]
        return found

    found = wait_for(slaac, timeout=15, what="SLAAC address")
    assert found[0]["prefixlen"] == 64
    routes = json.loads(target.run("ip", "-j", "-6", "route", "show", "default").stdout)
    ll = run(topo.host.cmd("ip", "-j", "-6", "addr", "show", "dev", "eth0", "scope", "link"))
    our_ll = next(a["local"] for a in json.loads(ll.stdout)[0]["addr_info"] if "local" in a)
    assert routes and routes[0]["gateway"] == our_ll


@pytest.mark.parametrize("asked", [False, True], ids=["default", "dhcp-dns"])
def test_dhcpv6_lease_with_dhclient(topo, procs, pasta, tmp_path, asked):
    extra = ("--dhcp-dns", "--dhcp-search") if asked else ()
    target, _ = start_pasta(topo, procs, pasta, *extra)
    # dhclient needs a usable link-local address first
    wait_for(lambda: "tentative" not in target.run("ip", "-6", "addr", "show", "dev", "eth0",
                                                     "scope", "link").stdout
             and "fe80" in target.run("ip", "-6", "addr", "show", "dev", "eth0").stdout,
             timeout=10, what="link-local address")
    leases = tmp_path / "dhclient6.leases"
    script = tmp_path / "dhclient-script"
    script.write_text("#!/bin/sh\nenv | sort > \"$(dirname \"$0\")/env.$reason\"\n")
    script.chmod(0o755)
    pidfile = tmp_path / "dhclient.pid"
    # -1: one try, exit on failure; once bound it goes to the background (stopped below)
    r = run(target.cmd("dhclient", "-6", "-1", "-v", "-lf", str(leases), "-pf", str(pidfile),
                       "-sf", str(script), "eth0"), check=False, timeout=30)
    text = leases.read_text() if leases.exists() else ""
    if "iaaddr" in text:
        # bound: its background child writes the pid file a moment after the parent exits
        pid = wait_for(lambda: pidfile.exists() and pidfile.read_text().strip().isdigit()
                       and int(pidfile.read_text()), timeout=5, what="dhclient's pid file")
        procs.adopt(pid)
    assert f"iaaddr {HOST6}" in text, r.stdout + r.stderr + text
    env = (tmp_path / "env.BOUND6").read_text()
    assert f"new_ip6_address={HOST6}" in env
    assert (DNS6 in env) is asked and (SEARCH[0] in env) is asked, env


def test_pcap_of_dhcp_decodes(topo, procs, pasta, tmp_path):
    if not shutil.which("tshark"):
        pytest.fail("tshark is required (tools/test.sh installs it)")
    cap = tmp_path / "dhcp.pcap"
    target, p = start_pasta(topo, procs, pasta, "-p", str(cap))
    udhcpc(target, tmp_path)
    p.terminate()
    p.wait(5)
    r = run(["tshark", "-r", str(cap), "-Y", "dhcp", "-T", "fields",
             "-e", "dhcp.option.dhcp", "-e", "dhcp.ip.your", "-e", "dhcp.option.router"],
            timeout=60)
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    types = [row[0] for row in rows]
    assert types[:4] == ["1", "2", "3", "5"], rows          # DISCOVER OFFER REQUEST ACK
    assert rows[1][1] == HOST4 and rows[1][2] == GW4



def test_no_dhcp_means_no_lease(topo, procs, pasta, tmp_path):
    target, _ = start_pasta(topo, procs, pasta, "--no-dhcp")
    script = tmp_path / "udhcpc.sh"
    script.write_text(UDHCPC_SCRIPT)
    script.chmod(0o755)
    r = run(target.cmd("env", f"LEASE_OUT={tmp_path / 'lease.txt'}", "busybox", "udhcpc",
                       "-i", "eth0", "-f", "-q", "-n", "-t", "2", "-T", "1", "-s", str(script)),
            check=False, timeout=20)
    assert r.returncode != 0 and not (tmp_path / "lease.txt").exists()


def test_no_ra_means_no_slaac(topo, procs, pasta):
    target, _ = start_pasta(topo, procs, pasta, "--no-ra")
    target.run("ip", "link", "set", "eth0", "up")
    # a router solicitation goes unanswered: the link keeps only its link-local address
    time.sleep(3)
    addrs = json.loads(target.run("ip", "-j", "-6", "addr", "show", "dev", "eth0").stdout)
    assert not [a for a in addrs[0]["addr_info"] if a.get("scope") == "global"]


def test_interface_option_wins_over_outbound_if(topo, procs, pasta, tmp_path):
    """pasta(1): --outbound-if4 also names the template interface, unless -i is given."""
    add_side_link(topo.host)
    target, _ = start_pasta(topo, procs, pasta, "-I", "eth0", "--outbound-if4", "side0")
    (tmp_path / "side").mkdir()
    assert udhcpc(target, tmp_path / "side")["ip"] == "10.99.0.2"
    target, _ = start_pasta(topo, procs, pasta, "-I", "eth0", "-i", "eth0",
                            "--outbound-if4", "side0")
    (tmp_path / "eth0").mkdir()
    assert udhcpc(target, tmp_path / "eth0")["ip"] == HOST4
