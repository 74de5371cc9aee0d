"""Today's callers, each with its exact command line, cited from its source.

- QEMU `-netdev passt` (QEMU 10.1+, net/passt.c, net_passt_decode_args()):
  passt --quiet [--mtu N] [--address A] [--netmask M] [--mac-addr MAC] ...
  [--freebind] [--tcp-ports LIST] --pid PIDFILE --fd 3; the socket pair's
  other end is fd 3, QEMU waits for passt to exit (daemonised) and reads
  PIDFILE, which it created empty beforehand (g_file_open_tmp).
- rootlesskit `--net=pasta` (pkg/network/pasta/pasta.go, ConfigureNetwork()):
  pasta --stderr --ns-ifname=tap0 --mtu=65520 --config-net
  --address=10.0.2.100 --netmask=24 --gateway=10.0.2.2 --dns-forward=10.0.2.3
  [--no-map-gw] [--ipv4-only] --tcp-ports=auto|none --udp-ports=auto|none
  then PID, or --userns=/proc/PID/ns/user --netns=PATH (detached netns);
  run as the user, waiting for exit (CombinedOutput).
- rootlesskit's pesto port driver (pkg/port/pasta/pesto.go, createArgs()):
  pesto -A|-D --tcp-ports=PARENTIP/PARENTPORT:CHILDPORT SOCKETPATH.
- podman 5/6 (common/libnetwork/pasta/pasta_linux.go, createPastaArgs(), and
  its pesto client pesto_linux.go, portMappingsToPestoArgs()): the argv of
  integration/test_podman5.py; here the cases that needed this issue:
  `pasta_options = ["-t", "auto"]` with `-p`, `--map-guest-addr none` given
  by the user (podman then adds none of its own), and the rootless netns
  with a control socket (`--pid PATH -c PATH`) changed by
  `pesto --add -t HOSTIP/PORT:CONTAINERIP/PORT ... PATH`.
- libvirt's passt argv is in test_passt_lifecycle.py (a QEMU guest); its
  port-forward strings (qemuPasstStart(): "ADDR%DEV/", "all", "~N", "N-M:T-U")
  are rows of tests/test_fwd.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from integration.conftest import GW4, HOST4, HOST6, our_command, pid_alive, run, wait_for
from integration.test_podman5 import (  # noqa: F401 - fixtures
    Rootless,
    check_configured,
    host_fetch,
    podman_argv,
    remove_netns_ends_pasta,
    rootless,
    serve_in_netns,
    start_pasta,
    subid_user,
    the_pasta,
)
from integration.test_tcp import MIB, server, server_results

XFER = str(Path(__file__).with_name("xfer.py"))
PY = sys.executable
GUEST_MAC = "52:54:00:12:34:56"


# ---------------------------------------------------------------- QEMU -netdev passt


def frames(sock: socket.socket, want, timeout: float = 5.0) -> bytes:
    """The first frame of the 4-byte-length stream for which want(frame) holds."""
    sock.settimeout(timeout)
    data, end = b"", time.monotonic() + timeout
    while time.monotonic() < end:
        while len(data) >= 4 and len(data) >= 4 + struct.unpack_from("!I", data)[0]:
            n = struct.unpack_from("!I", data)[0]
            frame, data = data[4:4 + n], data[4 + n:]
            if want(frame):
                return frame
        chunk = sock.recv(1 << 16)
        assert chunk, "passt closed the stream"
        data += chunk
    raise AssertionError("no such frame")


def dhcp_discover(mac: bytes) -> bytes:
    from tests.test_passt import dhcp, prefixed
    frame = dhcp(1)
    return prefixed(frame[:6] + mac + frame[12:])   # from our MAC


def test_qemu_netdev_passt(topo, tmp_path):
    pidfile = tmp_path / "passt-XXXXXX.pid"
    pidfile.write_text("")                         # QEMU's g_file_open_tmp made it
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = [*our_command("passt"), "--quiet", "--mtu", "1500", "--address", "10.77.0.50",
            "--netmask", "24", "--mac-addr", "9a:55:9a:55:9a:01", "--freebind",
            "--tcp-ports", "10080:8080", "--pid", str(pidfile), "--fd", "3"]
    # g_subprocess_launcher_take_fd(launcher, sock, 3), then g_subprocess_wait()
    on_fd3 = ("import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); "
              "fd != 3 and os.close(fd); os.execvp(sys.argv[2], sys.argv[2:])")
    r = subprocess.run(topo.host.cmd(PY, "-c", on_fd3, str(theirs.fileno()), *argv),
                       pass_fds=(theirs.fileno(),), capture_output=True, text=True, timeout=30)
    theirs.close()
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r
    pid = int(pidfile.read_text())
    try:
        assert pid_alive(pid)
        mac = bytes.fromhex(GUEST_MAC.replace(":", ""))
        ours.sendall(dhcp_discover(mac))
        offer = frames(ours, lambda f: f[12:14] == b"\x08\x00" and f[23] == 17
                       and f[34:38] == b"\x00\x43\x00\x44")
        assert offer[6:12] == bytes.fromhex("9a559a559a01")          # --mac-addr
        assert socket.inet_ntoa(offer[58:62]) == "10.77.0.50"          # yiaddr
        assert ":10080 " in topo.host.run("ss", "-Hltn").stdout
    finally:
        ours.close()                                 # --fd: the guest leaving ends passt
        end = time.monotonic() + 5
        while pid_alive(pid) and time.monotonic() < end:
            time.sleep(0.05)
        assert not pid_alive(pid)


# ---------------------------------------------------------------- rootlesskit


def rootlesskit_argv(*, implicit_ports: bool, ipv6: bool = False,
                     disable_host_loopback: bool = True) -> list[str]:
    argv = ["--stderr", "--ns-ifname=tap0", "--mtu=65520", "--config-net",
            "--address=10.0.2.100", "--netmask=24", "--gateway=10.0.2.2",
            "--dns-forward=10.0.2.3"]
    if disable_host_loopback:
        argv.append("--no-map-gw")
    if not ipv6:
        argv.append("--ipv4-only")
    ports = "auto" if implicit_ports else "none"
    return argv + [f"--tcp-ports={ports}", f"--udp-ports={ports}"]


@pytest.fixture
def child(topo, test_user):
    """rootlesskit's child: a user+network namespace of the test user."""
    uid, gid = test_user
    p = subprocess.Popen(topo.host.cmd("setpriv", f"--reuid={uid}", f"--regid={gid}",
                                       "--clear-groups", "--", "unshare", "--user",
                                       "--map-root-user", "--net", "sleep", "600"),
                         stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:        # until `sleep` runs in the new namespaces
            try:
                if os.readlink(f"/proc/{p.pid}/ns/net") != os.readlink("/proc/self/ns/net") \
                        and open(f"/proc/{p.pid}/comm").read().strip() == "sleep":
                    break
            except OSError:
                pass
            time.sleep(0.02)
        yield p.pid
    finally:
        p.kill()
        p.wait()


def as_test_user(topo, test_user, *argv: str) -> list[str]:
    uid, gid = test_user
    return topo.host.cmd("setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                         "--", *argv)


def in_child(pid: int, *argv: str) -> list[str]:
    return ["nsenter", "-t", str(pid), "-n", "--", *argv]


def check_child(topo, procs, pid: int, seed: int) -> None:
    addrs = run(in_child(pid, "ip", "-o", "-4", "addr", "show", "dev", "tap0")).stdout
    assert "inet 10.0.2.100/24" in addrs, addrs
    assert "default via 10.0.2.2 dev tap0" in run(in_child(pid, "ip", "route")).stdout
    srv = server(procs, topo.router, GW4, "sink", MIB, seed=seed, port=6400 + seed)
    r = run(in_child(pid, PY, XFER, "client", "--connect", GW4, "--port", str(6400 + seed),
                     "--mode", "send", "--size", str(MIB), "--seed", str(seed)), check=False)
    assert json.loads(r.stdout.splitlines()[-1])["ok"], r.stdout + r.stderr
    assert server_results(srv)[0]["peer"] == HOST4      # the host's own address: no NAT


def adopt_pastas(procs, marker: str) -> None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker.encode() in argv and any(b"pasta" in a for a in argv[:2]):
                procs.adopt(int(entry))


def test_rootlesskit_pid_form(topo, procs, pasta, test_user, child, tmp_path):
    ctl = f"/tmp/passt-py-rlk-{child}.ctl"
    argv = [*pasta, *rootlesskit_argv(implicit_ports=False), "-c", ctl, str(child)]
    try:
        r = run(as_test_user(topo, test_user, *argv), check=False, timeout=30)
        adopt_pastas(procs, str(child))
        assert r.returncode == 0, r.stdout + r.stderr
        check_child(topo, procs, child, 1)
        # the pesto port driver: -A, then -D, with rootlesskit's own spec form
        procs_srv = procs.start(in_child(child, PY, XFER, "server", "--bind", "0.0.0.0",
                                         "--port", "80", "--mode", "sink", "--size", str(MIB),
                                         "--seed", "3"), text=True)
        assert json.loads(procs_srv.stdout.readline()) == {"listening": 80}
        pesto = [*our_command("pesto")]
        run(as_test_user(topo, test_user, *pesto, "-A", "--tcp-ports=0.0.0.0/6480:80", ctl))
        r = run(topo.router.cmd(PY, XFER, "client", "--connect", HOST4, "--port", "6480",
                                "--mode", "send", "--size", str(MIB), "--seed", "3"),
                check=False)
        assert json.loads(r.stdout.splitlines()[-1])["ok"], r.stdout + r.stderr
        assert server_results(procs_srv)[0]["peer"] == GW4
        run(as_test_user(topo, test_user, *pesto, "-D", "--tcp-ports=0.0.0.0/6480:80", ctl))
        assert ":6480 " not in topo.host.run("ss", "-Hltn").stdout
    finally:
        if os.path.exists(ctl):
            os.unlink(ctl)


@pytest.fixture
def detached_netns(child):
    """rootlesskit --detach-netns: the child's network namespace on a file (a bind mount)."""
    d = Path(tempfile.mkdtemp(prefix="passt-py-rlk-"))
    d.chmod(0o755)
    path = d / "netns"
    path.touch()
    run(["mount", "--bind", f"/proc/{child}/ns/net", str(path)])
    try:
        yield str(path)
    finally:
        run(["umount", "-l", str(path)], check=False)
        shutil.rmtree(d, ignore_errors=True)


def test_rootlesskit_detached_netns_form(topo, procs, pasta, test_user, child, detached_netns):
    argv = [*pasta, *rootlesskit_argv(implicit_ports=True),
            f"--userns=/proc/{child}/ns/user", f"--netns={detached_netns}"]
    r = run(as_test_user(topo, test_user, *argv), check=False, timeout=30)
    adopt_pastas(procs, f"--netns={detached_netns}")
    assert r.returncode == 0, r.stdout + r.stderr
    check_child(topo, procs, child, 2)
    # --tcp-ports=auto: a listener in the child appears on the host
    srv = procs.start(in_child(child, PY, XFER, "server", "--bind", "0.0.0.0", "--port",
                               "6490", "--mode", "sink", "--size", str(MIB), "--seed", "4"),
                      text=True)
    assert json.loads(srv.stdout.readline()) == {"listening": 6490}
    wait_for(lambda: ":6490 " in topo.host.run("ss", "-Hltn").stdout, timeout=5,
             what="auto-forwarded port")
    r = run(topo.router.cmd(PY, XFER, "client", "--connect", HOST4, "--port", "6490",
                            "--mode", "send", "--size", str(MIB), "--seed", "4"), check=False)
    assert json.loads(r.stdout.splitlines()[-1])["ok"], r.stdout + r.stderr
    server_results(srv)


def test_netns_given_as_a_proc_path(topo, procs, pasta, test_user, child):
    """`--userns=/proc/PID/ns/user --netns=/proc/PID/ns/net`, rootless (as scripts and
    rootlesskit's non-detached mode name a namespace): we serve it for as long as its
    process lives, and end when it ends."""
    argv = [*pasta, *rootlesskit_argv(implicit_ports=False),
            f"--userns=/proc/{child}/ns/user", f"--netns=/proc/{child}/ns/net"]
    r = run(as_test_user(topo, test_user, *argv), check=False, timeout=30)
    adopt_pastas(procs, f"--netns=/proc/{child}/ns/net")
    assert r.returncode == 0, r.stdout + r.stderr
    ours = procs.pids[-1]
    time.sleep(2)            # it used to give up here: the periodic stat() was refused
    assert pid_alive(ours)
    check_child(topo, procs, child, 5)
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: not pid_alive(ours), timeout=2, what="pasta to exit with its namespace")


# ---------------------------------------------------------------- podman


def test_podman_pasta_options_auto_and_a_published_port(rootless: Rootless, procs):  # noqa: F811
    """pasta_options = ["-t", "auto"] and -p 18082:18082: both forwarded."""
    res = start_pasta(rootless, procs, podman_argv(rootless.netns, extras=("-t", "auto"),
                                                   ports=("18082-18082:18082-18082",)))
    assert res.returncode == 0, res.stdout
    pid = the_pasta(rootless)
    serve_in_netns(rootless, procs, 18082, "published")
    serve_in_netns(rootless, procs, 18083, "found")
    assert host_fetch(rootless.host, HOST4, 18082).strip() == "published"
    assert wait_for(lambda: host_fetch(rootless.host, "127.0.0.1", 18083).strip(),
                    timeout=5, what="auto port") == "found"
    remove_netns_ends_pasta(rootless, pid)


def test_podman_user_map_guest_addr_none(rootless: Rootless, procs):  # noqa: F811
    """The user's --map-guest-addr none: podman adds no 169.254.1.2 of its own."""
    argv = podman_argv(rootless.netns, extras=("--map-guest-addr", "none"))
    assert argv[-2:] == ["--map-guest-addr", "169.254.1.2"]
    argv = argv[:-2]                         # createPastaArgs(): mapGuestAddrIPs not empty
    res = start_pasta(rootless, procs, argv)
    assert res.returncode == 0 and res.stdout == "", res.stdout
    pid = the_pasta(rootless)
    check_configured(rootless)
    assert pid_alive(pid)
    remove_netns_ends_pasta(rootless, pid)


def test_podman_rootless_netns_with_pesto(rootless: Rootless, procs):  # noqa: F811
    """Rootless bridge networks with pasta as port forwarder: the shared pasta has a
    control socket, and podman adds each container's ports with pesto."""
    ctl = os.path.join(rootless.rundir, "pasta.sock")
    pid_path = os.path.join(rootless.rundir, "rootless-netns-conn.pid")
    res = start_pasta(rootless, procs, podman_argv(rootless.netns,
                                                   extras=("--pid", pid_path, "-c", ctl)))
    assert res.returncode == 0, res.stdout
    pid = the_pasta(rootless)
    # the container's addresses behind the rootless netns (netavark's bridge)
    run(rootless.in_netns("ip", "addr", "add", "10.88.0.2/32", "dev", "lo"))
    run(rootless.in_netns("ip", "addr", "add", "fd00::2/128", "dev", "lo"))
    serve_in_netns(rootless, procs, 8080, "container")
    pesto = our_command("pesto")
    r = rootless.run(*pesto, "--add", "-t", "0.0.0.0/18084:10.88.0.2/8080",
                     "-t", "[::]/18084:fd00::2/8080", ctl, check=False)
    assert r.returncode == 0, r.stderr
    assert host_fetch(rootless.host, HOST4, 18084).strip() == "container"
    assert host_fetch(rootless.host, HOST6, 18084).strip() == "container"
    r = rootless.run(*pesto, "--delete", "-t", "0.0.0.0/18084:10.88.0.2/8080",
                     "-t", "[::]/18084:fd00::2/8080", ctl, check=False)
    assert r.returncode == 0, r.stderr
    assert ":18084 " not in rootless.host.run("ss", "-Hltn").stdout
    remove_netns_ends_pasta(rootless, pid)
