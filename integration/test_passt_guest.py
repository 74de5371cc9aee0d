"""Our passt serving the QEMU test guest: over `-netdev stream`, through our qrap, and
with `--vhost-user` (QEMU's `-netdev vhost-user`, guest memory shared through a memfd).

For each transport one guest boots and runs every check in one script (a
boot costs ~8 s under TCG): DHCP and SLAAC, ping to the gateway, TCP and UDP
transfers both ways with SHA-256 checks, and servers for ports passt
forwards into it with -t.  The tests below each judge one part of that run.

Nothing leaves the machine: passt runs in a "host" namespace whose only link
is a veth to a "router" namespace (see integration/guest/hostnet.py), with
its own resolv.conf.  The host's services (integration/test_passt_services.py)
listen in the host namespace, reached by the guest through the gateway
address (mapped to the host's loopback), and in the router namespace on a
"remote" address, reached through the host's route.  UDP is TFTP, which the
busybox guest speaks and which is lock-step, hence loss-free.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from integration.conftest import our_command
from integration.guest import GuestImage, GuestResult, build_guest, default_cache_dir, run_guest
from integration.guest.hostnet import Uplink, daemon, socket_dir, uplink_namespaces
from integration.test_passt_services import payload, read_results

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 300.0
SIZE = 4 << 20
SEED = 5
DNS4, DNS6, SEARCH = "10.77.0.53", "fd77::53", "example.test"
REMOTE4, REMOTE6 = "10.77.1.1", "fd77:1::1"
GUEST_MAC = "52:54:00:12:34:56"
# what passt says once it serves (its socket listens earlier, and qrap's probe waits 0.5 s)
READY_TEXT = "UNIX domain socket bound at"
SERVICES = Path(__file__).with_name("test_passt_services.py")
EXPECTED_SHA = hashlib.sha256(payload(SEED, SIZE)).hexdigest()

# The guest's side of every check; each result is a KEY=VALUE line on the console.
GUEST_SCRIPT = r"""
udhcpc -i eth0 -n -q >/dev/null 2>&1 || exit 10
echo "LEASE-ADDR=$(ip -4 -o addr show dev eth0 | awk '{print $4}')"
echo "LEASE-ROUTER=$(ip -4 route show default | awk '{print $3}')"
echo "LEASE-DNS=$(awk '/^nameserver/ {print $2}' /etc/resolv.conf | tr '\n' ' ')"
echo "MTU=$(cat /sys/class/net/eth0/mtu)"
n=0
until ip -6 addr show dev eth0 scope global | grep -q 'inet6 fd77:'; do
    n=$((n+1)); [ $n -gt 100 ] && break
    usleep 100000
done
echo "SLAAC=$(ip -6 -o addr show dev eth0 scope global | awk '{print $4}' | head -1)"
dd if=/dev/urandom of=/tmp/up bs=64k count=@BLOCKS@ 2>/dev/null
echo "UP-SHA=$(sha256sum /tmp/up | cut -d' ' -f1)"
nc -l -p 2222 -e cat /tmp/up & FWD1=$!
nc -l -p 2223 -e sha256sum & FWD2=$!
ping -c 3 -W 5 @GW4@ >/dev/null 2>&1; echo "PING4=$?"
ping6 -c 3 -W 5 @GW6@ >/dev/null 2>&1; echo "PING6=$?"
for dst in @GW4@ @REMOTE4@ @GW6@ @REMOTE6@; do
    echo "TCP-UP-$dst=$(timeout 120 nc $dst 5001 < /tmp/up)"
    echo "TCP-DOWN-$dst=$(timeout 120 nc $dst 5002 < /dev/null | sha256sum | cut -d' ' -f1)"
done
timeout 120 tftp -b 16384 -p -l /tmp/up -r up @GW4@ 6969; echo "UDP-UP=$?"
rm -f /tmp/down
timeout 120 tftp -b 16384 -g -l /tmp/down -r down @GW4@ 6969
echo "UDP-DOWN=$(sha256sum /tmp/down | cut -d' ' -f1)"
n=0
while kill -0 $FWD1 2>/dev/null || kill -0 $FWD2 2>/dev/null; do
    n=$((n+1)); [ $n -gt 900 ] && break
    usleep 100000
done
echo "FWD-WAITED=$n"
"""


def guest_script(up: Uplink, size: int = SIZE) -> str:
    text = GUEST_SCRIPT
    for key, value in (("@BLOCKS@", str(size // 65536)), ("@GW4@", up.gw4), ("@GW6@", up.gw6),
                       ("@REMOTE4@", REMOTE4), ("@REMOTE6@", REMOTE6)):
        text = text.replace(key, value)
    return text


def values(console: str) -> dict[str, str]:
    return {m[1]: m[2].strip() for m in re.finditer(r"^([A-Z0-9][\w.:-]*)=(.*)$", console, re.M)}


def require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"not installed (tools/test.sh installs them): {', '.join(missing)}")
    if os.geteuid() != 0:
        pytest.fail("needs root for network namespaces")


# ---------------------------------------------------------------- the host side


@contextmanager
def host_world(tag: str | None = None) -> Iterator[Uplink]:
    """Uplink namespaces with a resolv.conf, a remote address and the host services."""
    with uplink_namespaces(tag) as up:
        etc = Path("/etc/netns") / up.host_ns
        etc.mkdir(parents=True, exist_ok=True)
        try:
            (etc / "resolv.conf").write_text(
                f"nameserver {DNS4}\nnameserver {DNS6}\nsearch {SEARCH}\n")
            # like the usual distribution default: ping sockets for every group
            subprocess.run(["ip", "netns", "exec", up.host_ns, "sysctl", "-qw",
                            "net.ipv4.ping_group_range=0 2147483647"], check=True)
            for cmd in (["addr", "add", f"{REMOTE4}/32", "dev", "lo"],
                        ["-6", "addr", "add", f"{REMOTE6}/128", "dev", "lo", "nodad"]):
                subprocess.run(["ip", "-n", up.router_ns, *cmd], check=True)
            yield up
        finally:
            shutil.rmtree(etc, ignore_errors=True)


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


@contextmanager
def services(up: Uplink, results: Path, log: Path) -> Iterator[None]:
    tcp = lambda addr: ["--tcp", f"{addr},5001,sink", "--tcp", f"{addr},5002,source"]  # noqa: E731
    common = ["--results", str(results), "--size", str(SIZE), "--seed", str(SEED)]
    procs = []
    try:
        for ns, args in ((up.host_ns, [*tcp("0.0.0.0"), *tcp("::"), "--tftp", "0.0.0.0,6969"]),
                         (up.router_ns, [*tcp(REMOTE4), *tcp(REMOTE6)])):
            p = subprocess.Popen(in_ns(ns, sys.executable, str(SERVICES), "serve", *common,
                                       *args), stdout=subprocess.PIPE,
                                 stderr=open(log, "ab"), text=True)
            procs.append(p)
            assert p.stdout.readline().strip() == "ready", log.read_text()
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()
            p.stdout.close()


def forward_clients(up: Uplink, results: Path, log: Path) -> list[subprocess.Popen]:
    """Host-side clients for the ports forwarded into the guest (they retry)."""
    out = []
    for kind, port in (("get", 10022), ("put", 10023)):
        out.append(subprocess.Popen(
            in_ns(up.host_ns, sys.executable, str(SERVICES), kind, "--connect",
                  f"127.0.0.1,{port}", "--results", str(results), "--tag", kind,
                  "--size", str(SIZE), "--seed", str(SEED + 1), "--deadline", "240"),
            stdout=subprocess.DEVNULL, stderr=open(log, "ab")))
    return out


def stream_netdev(sock: Path) -> list[str]:
    return ["-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={sock}"]


GUEST_MEMORY_MB = 256
# QEMU 7.2 under TCG crashes starting a vhost device whose virtio-net-pci has MSI-X
# (msix_set_vector_notifiers, in vhost_net_start): the test guest uses INTx instead
VHOST_DEVICE_OPTS = "vectors=0"


def vhost_netdev(sock: Path, memory_mb: int = GUEST_MEMORY_MB) -> list[str]:
    """QEMU's side of vhost-user: the socket, and guest memory passt can map (shared)."""
    return ["-chardev", f"socket,id=chr0,path={sock}",
            "-netdev", "vhost-user,id=n0,chardev=chr0",
            "-object", f"memory-backend-memfd,id=mem0,share=on,size={memory_mb}M",
            "-numa", "node,memdev=mem0"]


def run_through_qrap(image: GuestImage, sdir: Path, script: str, qrap: list[str],
                     **kw) -> GuestResult:
    """qrap only probes /tmp/passt_N.socket: give it a private /tmp that is the socket
    directory, so other passt instances are never picked up (QEMU's files go elsewhere)."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as work:
        wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount --bind "$0" /tmp && exec "$@"', str(sdir), *qrap, "5"]
        return run_guest(image, ["-netdev", "socket,fd=5,id=n0"], script, BOOT_TIMEOUT,
                         wrapper=wrapper, workdir=Path(work), **kw)


@dataclass
class GuestRun:
    transport: str
    up: Uplink
    result: GuestResult
    values: dict[str, str]
    host: list[dict] = field(default_factory=list)
    passt_log: str = ""
    passt_rc: int | None = None

    def why(self) -> str:
        return (f"\n--- console ---\n{self.result.console[-4000:]}\n--- host results ---\n"
                f"{self.host}\n--- passt log ---\n{self.passt_log[-3000:]}\n"
                f"--- qemu ---\n{self.result.qemu_stderr[-1000:]}")


@pytest.fixture(scope="module")
def guest_image() -> GuestImage:
    require(QEMU, "ip", "unshare")
    return build_guest(default_cache_dir())


def boot(image: GuestImage, transport: str, work: Path,
         passt_args: tuple[str, ...] = ()) -> GuestRun:
    passt = our_command("passt")
    with ExitStack() as stack:
        up = stack.enter_context(host_world())
        sdir = stack.enter_context(socket_dir())
        results = work / f"{transport}.results.jsonl"
        stack.enter_context(services(up, results, work / "services.log"))
        sock = sdir / ("passt_1.socket" if transport == "qrap" else "passt.socket")
        log = work / f"passt-{transport}.log"
        if transport == "vhost-user":
            passt_args = ("--vhost-user", *passt_args)
        cmd = [*up.exec_prefix(), *passt, "-f", "-d", "--one-off",
               "-t", "10022:2222,10023:2223", "-s", str(sock), *passt_args]
        proc = stack.enter_context(daemon(cmd, log, ready=sock, ready_text=READY_TEXT))
        clients = forward_clients(up, results, work / "clients.log")
        script = guest_script(up)
        started = time.monotonic()
        if transport == "qrap":
            result = run_through_qrap(image, sdir, script, our_command("qrap"))
        elif transport == "vhost-user":
            result = run_guest(image, vhost_netdev(sock), script, BOOT_TIMEOUT,
                               memory_mb=GUEST_MEMORY_MB, device_opts=VHOST_DEVICE_OPTS)
        else:
            result = run_guest(image, stream_netdev(sock), script, BOOT_TIMEOUT)
        print(f"{transport}: guest ran {time.monotonic() - started:.1f} s", file=sys.stderr)
        for c in clients:
            try:
                c.wait(timeout=5)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait()
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            rc = None
        return GuestRun(transport, up, result, values(result.console), read_results(results),
                        log.read_text(errors="replace"), rc)


@pytest.fixture(scope="module", params=["stream", "qrap", "vhost-user"])
def run(request, guest_image: GuestImage, tmp_path_factory) -> GuestRun:
    return boot(guest_image, request.param, tmp_path_factory.mktemp(request.param))


# ---------------------------------------------------------------- the checks


@pytest.mark.qemu
def test_guest_ran_to_the_end(run: GuestRun) -> None:
    assert run.result.exit_code == 0, run.why()
    assert "FWD-WAITED" in run.values, run.why()
    assert "Traceback" not in run.passt_log, run.why()
    if run.transport == "qrap":
        assert "Connected to /tmp/passt_1.socket" in run.result.qemu_stderr, run.why()


@pytest.mark.qemu
def test_dhcp_lease_is_the_hosts(run: GuestRun) -> None:
    v, up = run.values, run.up
    assert v.get("LEASE-ADDR") == f"{up.addr4}/{up.prefix4}", run.why()
    assert v.get("LEASE-ROUTER") == up.gw4, run.why()
    assert v.get("LEASE-DNS", "").split() == [DNS4], run.why()
    assert v.get("MTU") == "65520", run.why()


@pytest.mark.qemu
def test_slaac_address_in_the_hosts_prefix(run: GuestRun) -> None:
    addr = run.values.get("SLAAC", "")
    assert re.fullmatch(r"fd77::[0-9a-f:]+/64", addr), run.why()


@pytest.mark.qemu
def test_ping_gateway(run: GuestRun) -> None:
    assert run.values.get("PING4") == "0", run.why()
    assert run.values.get("PING6") == "0", run.why()


def _host(run: GuestRun, svc: str, **match) -> list[dict]:
    return [e for e in run.host if e.get("svc") == svc
            and all(e.get(k) == v for k, v in match.items())]


@pytest.mark.qemu
@pytest.mark.parametrize("where", ["gw4", "remote4", "gw6", "remote6"])
def test_tcp_transfers_both_ways(run: GuestRun, where: str) -> None:
    dst = {"gw4": run.up.gw4, "remote4": REMOTE4, "gw6": run.up.gw6, "remote6": REMOTE6}[where]
    up_sha = run.values.get("UP-SHA")
    assert up_sha and len(up_sha) == 64, run.why()
    # guest -> host: the sink's answer, and what the sink recorded
    assert run.values.get(f"TCP-UP-{dst}") == up_sha, run.why()
    sinks = [e for e in _host(run, "tcp-sink") if e.get("sha") == up_sha]
    assert sinks, run.why()
    # host -> guest
    assert run.values.get(f"TCP-DOWN-{dst}") == EXPECTED_SHA, run.why()
    # the gateway reaches the host's loopback; the remote sees the host's own address
    if where == "gw4":
        assert any(e["peer"] == "127.0.0.1" for e in sinks), run.why()
    elif where == "remote4":
        assert any(e["peer"] == run.up.addr4 for e in sinks), run.why()


@pytest.mark.qemu
def test_udp_transfers_both_ways(run: GuestRun) -> None:
    up_sha = run.values.get("UP-SHA")
    assert run.values.get("UDP-UP") == "0", run.why()
    assert [e for e in _host(run, "tftp-write") if e.get("sha") == up_sha], run.why()
    assert run.values.get("UDP-DOWN") == EXPECTED_SHA, run.why()


@pytest.mark.qemu
def test_forwarded_ports_reach_servers_in_the_guest(run: GuestRun) -> None:
    up_sha = run.values.get("UP-SHA")
    gets = _host(run, "fwd-get")
    assert gets and gets[0].get("sha") == up_sha, run.why()
    puts = _host(run, "fwd-put")
    assert puts and puts[0].get("guest_sha") == puts[0].get("sent_sha"), run.why()


@pytest.mark.qemu
def test_one_off_passt_exits_with_the_guest(run: GuestRun) -> None:
    assert run.passt_rc == 0, run.why()
