"""Boots the cached guest once under QEMU (TCG) with a per-run test script.

The script (as /test.sh) and any extra files go into a second, small cpio archive
appended to a copy of the cached initramfs: the kernel unpacks concatenated archives in
order, so the base image is never rebuilt per test. The serial console goes to a file;
/init prints GUEST-EXIT=<status> when /test.sh ends, then powers off. On timeout QEMU
(our child, or the wrapper that exec()s it, such as qrap) is killed by PID.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .builder import GuestImage
from .cpio import CpioWriter
from .scripts import EXIT_MARKER

DEFAULT_MAC = "52:54:00:12:34:56"
KERNEL_CMDLINE = "console=ttyS0 loglevel=3 panic=-1 oops=panic mitigations=off"

_EXIT_RE = re.compile(rf"^{EXIT_MARKER}(\d+)\s*$", re.M)


@dataclass(frozen=True)
class GuestResult:
    exit_code: int | None  # status of /test.sh, None if the guest never reported one
    console: str  # serial console, "\r\n" folded to "\n"
    timed_out: bool = False
    elapsed: float = 0.0  # seconds from starting QEMU to its exit
    qemu_returncode: int | None = None
    qemu_stderr: str = ""


def run_archive(script: str, extra_files: dict[str, bytes] | None = None) -> bytes:
    """The per-run cpio: /test.sh plus extra files (paths relative to /, mode 0644,
    0755 for paths under bin/ or ending in .sh)."""
    w = CpioWriter(first_inode=1_000_000)
    w.file("test.sh", script.encode(), 0o755)
    for path, data in (extra_files or {}).items():
        name = path.lstrip("/")
        executable = name.endswith(".sh") or "/bin/" in f"/{name}"
        w.file(name, data, 0o755 if executable else 0o644)
    return w.getvalue()


def qemu_command(image: GuestImage, initrd: Path, console: Path, netdev: Sequence[str],
                 qemu: str = "qemu-system-x86_64", *, mac: str = DEFAULT_MAC,
                 netdev_id: str = "n0", memory_mb: int = 256, device_opts: str = "",
                 extra_args: Sequence[str] = ()) -> list[str]:
    cmd = [
        qemu, "-accel", "tcg", "-m", str(memory_mb), "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", f"file:{console}", "-monitor", "none",
        "-kernel", str(image.kernel), "-initrd", str(initrd),
        "-append", KERNEL_CMDLINE,
    ]
    if netdev:
        opts = f",{device_opts}" if device_opts else ""
        cmd += ["-device", f"virtio-net-pci,netdev={netdev_id},mac={mac}{opts}", *netdev]
    return cmd + list(extra_args)


def run_guest(image: GuestImage, netdev: list[str], script: str, timeout: float,
              extra_files: dict[str, bytes] | None = None,
              qemu: str = "qemu-system-x86_64", wrapper: list[str] | None = None,
              *, mac: str = DEFAULT_MAC, netdev_id: str = "n0", memory_mb: int = 256,
              device_opts: str = "", extra_args: Sequence[str] = (),
              pass_fds: Sequence[int] = (), workdir: Path | None = None,
              on_start: Callable[[subprocess.Popen], None] | None = None) -> GuestResult:
    """Boot the guest, run `script` in it with sh, return its exit status and console.

    netdev: QEMU arguments for the backend, e.g. ["-netdev", "stream,id=n0,server=off,
    addr.type=unix,addr.path=SOCK"] or, under wrapper ["qrap", "5"], ["-netdev",
    "socket,fd=5,id=n0"]; a virtio-net-pci device with `mac` (and `device_opts`, more
    of its properties) is attached to `netdev_id`.  `on_start(proc)` is called once QEMU
    runs (a test may kill it: the result then says how it ended).
    An empty list boots without a network device. Per-run files (initrd copy, console
    log) go to a temporary directory under `workdir` (default: the system's), which
    must stay visible to QEMU: a wrapper that mounts over /tmp needs another workdir.
    """
    tmp = Path(tempfile.mkdtemp(prefix="passt-guest-run-", dir=workdir))
    try:
        initrd = tmp / "initrd.cpio"
        console = tmp / "console.log"
        with open(initrd, "wb") as out, open(image.initramfs, "rb") as base:
            shutil.copyfileobj(base, out)
            out.write(run_archive(script, extra_files))
        console.touch()
        cmd = [*(wrapper or []), *qemu_command(
            image, initrd, console, netdev, qemu, mac=mac, netdev_id=netdev_id,
            memory_mb=memory_mb, device_opts=device_opts, extra_args=extra_args)]
        started = time.monotonic()
        with open(tmp / "qemu.stderr", "w+b") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                    pass_fds=tuple(pass_fds), start_new_session=True)
            timed_out = False
            try:
                if on_start is not None:
                    on_start(proc)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.kill(proc.pid, 9)
                proc.wait()
            finally:
                if proc.returncode is None:  # interrupted (KeyboardInterrupt, ...)
                    os.kill(proc.pid, 9)
                    proc.wait()
            elapsed = time.monotonic() - started
            err.seek(0)
            stderr = err.read().decode(errors="replace")
        text = console.read_bytes().decode(errors="replace").replace("\r\n", "\n")
        codes = _EXIT_RE.findall(text)
        return GuestResult(
            exit_code=int(codes[-1]) if codes else None, console=text,
            timed_out=timed_out, elapsed=elapsed, qemu_returncode=proc.returncode,
            qemu_stderr=stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
