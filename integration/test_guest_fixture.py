"""The QEMU test guest fixture works: it builds, boots under TCG, runs a script, reports
its status, and gets an address from the installed C passt over -netdev stream and
through C qrap (-netdev socket,fd=5).

C passt runs in a namespace whose uplink is a veth to a router namespace, so nothing
leaves the machine. The cpio writer is checked against busybox's cpio extractor.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.guest import GuestImage, build_guest, default_cache_dir, run_guest
from integration.guest.cpio import CpioWriter
from integration.guest.hostnet import Uplink, daemon, socket_dir, uplink_namespaces

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 120.0

DHCP_SCRIPT = """
udhcpc -i eth0 -n -q || exit 10
ip -4 addr show dev eth0
ip -4 route
cat /etc/resolv.conf
n=0
until ip -6 addr show dev eth0 scope global | grep -q 'inet6 fd77:'; do
    n=$((n+1)); [ $n -gt 100 ] && exit 11
    usleep 100000
done
ip -6 addr show dev eth0 scope global
"""


def _require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"not installed (tools/test.sh installs them): {', '.join(missing)}")


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root for network namespaces")


def _check_dhcp(console: str, up: Uplink) -> None:
    assert re.search(rf"inet {re.escape(up.addr4)}/{up.prefix4} .*eth0", console), console
    assert re.search(rf"default via {re.escape(up.gw4)} dev eth0", console), console
    assert re.search(r"^nameserver \S+", console, re.M), console
    assert re.search(r"inet6 fd77::\S+/64 scope global", console), console


# -- cpio format, no QEMU needed ---------------------------------------------------------

def test_cpio_archive_extracts_with_busybox(tmp_path: Path) -> None:
    _require("busybox")
    w = CpioWriter()
    w.file("a/b/c.txt", b"hello")
    w.file("odd", b"x" * 5, 0o755)
    w.symlink("a/link", "b/c.txt")
    w.directory("empty")
    archive = w.getvalue()
    assert len(archive) % 512 == 0
    subprocess.run(["busybox", "cpio", "-id"], input=archive, cwd=tmp_path, check=True,
                   capture_output=True)
    assert (tmp_path / "a/b/c.txt").read_bytes() == b"hello"
    assert (tmp_path / "odd").read_bytes() == b"xxxxx"
    assert os.access(tmp_path / "odd", os.X_OK)
    assert os.readlink(tmp_path / "a/link") == "b/c.txt"
    assert (tmp_path / "empty").is_dir()


# -- the guest ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    _require(QEMU, "apt-get", "dpkg")
    return build_guest(default_cache_dir())


@pytest.fixture
def uplink() -> Iterator[Uplink]:
    _require_root()
    _require("ip")
    with uplink_namespaces() as up:
        yield up


@pytest.mark.qemu
def test_guest_runs_script_and_reports_status(guest_image: GuestImage) -> None:
    result = run_guest(guest_image, [], "cat /etc/extra; uname -r; exit 3", BOOT_TIMEOUT,
                       extra_files={"etc/extra": b"extra-file-content\n"})
    print(f"boot+run without network: {result.elapsed:.1f} s", file=sys.stderr)
    assert result.exit_code == 3, result.console + result.qemu_stderr
    assert "extra-file-content" in result.console
    assert not result.timed_out
    assert result.qemu_returncode == 0


@pytest.mark.qemu
def test_guest_timeout_kills_qemu(guest_image: GuestImage, tmp_path: Path) -> None:
    result = run_guest(guest_image, [], "sleep 600", timeout=8, workdir=tmp_path)
    assert result.timed_out
    assert result.exit_code is None
    assert result.qemu_returncode == -9
    assert list(tmp_path.iterdir()) == []  # per-run files removed


@pytest.mark.qemu
def test_guest_dhcp_from_c_passt_over_stream(guest_image: GuestImage, uplink: Uplink,
                                             tmp_path: Path) -> None:
    _require("passt")
    with socket_dir() as sdir:
        sock = sdir / "passt.sock"
        cmd = [*uplink.exec_prefix(), "passt", "-f", "--one-off", "-s", str(sock)]
        with daemon(cmd, tmp_path / "passt.log", ready=sock) as passt:
            netdev = ["-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={sock}"]
            result = run_guest(guest_image, netdev, DHCP_SCRIPT, BOOT_TIMEOUT)
            print(f"boot+DHCP over stream: {result.elapsed:.1f} s", file=sys.stderr)
            assert result.exit_code == 0, result.console + result.qemu_stderr
            _check_dhcp(result.console, uplink)
            assert passt.wait(timeout=10) == 0  # --one-off: gone with the guest


@pytest.mark.qemu
def test_guest_dhcp_from_c_passt_through_qrap(guest_image: GuestImage, uplink: Uplink,
                                              tmp_path: Path) -> None:
    _require("passt", "qrap", "unshare", "mount")
    # qrap only probes /tmp/passt_N.socket: give it a private /tmp that is our socket
    # directory, so parallel runs and other passt instances are never picked up. QEMU's
    # own files must then live outside /tmp.
    with socket_dir() as sdir, tempfile.TemporaryDirectory(dir="/var/tmp") as work:
        sock = sdir / "passt_1.socket"
        cmd = [*uplink.exec_prefix(), "passt", "-f", "--one-off", "-s", str(sock)]
        with daemon(cmd, tmp_path / "passt.log", ready=sock) as passt:
            wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       'mount --bind "$0" /tmp && exec "$@"', str(sdir), "qrap", "5"]
            result = run_guest(guest_image, ["-netdev", "socket,fd=5,id=n0"], DHCP_SCRIPT,
                               BOOT_TIMEOUT, wrapper=wrapper, workdir=Path(work))
            print(f"boot+DHCP through qrap: {result.elapsed:.1f} s", file=sys.stderr)
            assert "Connected to /tmp/passt_1.socket" in result.qemu_stderr
            assert result.exit_code == 0, result.console + result.qemu_stderr
            _check_dhcp(result.console, uplink)
            assert passt.wait(timeout=10) == 0


def test_concurrent_builds_share_one_image(tmp_path: Path) -> None:
    _require("apt-get", "dpkg")
    code = ("import sys; from pathlib import Path; from integration.guest import build_guest;"
            "print(build_guest(Path(sys.argv[1])).initramfs)")
    root = Path(__file__).resolve().parent.parent
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1
    assert Path(paths.pop()).stat().st_size > 1_000_000
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".lock")] == [
        Path(outs[0][0].strip()).parent.name]
