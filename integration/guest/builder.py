"""Builds and caches the minimal QEMU test guest: a Debian kernel plus a busybox initramfs.

The kernel is the package linux-image-amd64 currently points to (for Debian 12,
linux-image-6.1.0-N-amd64), fetched with `apt-get download` and unpacked with `dpkg -x`,
never installed. From it we take vmlinuz and the modules virtio_net and virtio_pci need,
ordered by the `depends=` field of each module's .modinfo section (the package ships no
modules.dep: depmod runs at install time). busybox comes from busybox-static the same way.

The result lives in CACHE/<kernel pkg>_<version>-bb<busybox version>-<hash>/, where the
hash covers the scripts and module list, so a new kernel or a changed /init rebuilds.
Concurrent builders serialise on a lock file, build into a hidden temporary directory
and rename it into place, so a reader never sees a half-written image.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .cpio import CpioWriter
from .scripts import INIT, MODULE_LIST, UDHCPC_SCRIPT

KERNEL_META = "linux-image-amd64"
BUSYBOX_PKG = "busybox-static"
ROOT_MODULES = ("virtio_pci", "virtio_net")
FORMAT = 1  # bump when the layout of the image changes in a way the hash cannot see

_APT_ENV = {**os.environ, "LC_ALL": "C", "LANG": "C"}


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initramfs: Path
    kernel_package: str = ""  # "name=version" of the Debian package vmlinuz came from


class GuestBuildError(RuntimeError):
    pass


def default_cache_dir() -> Path:
    """$PASST_PY_GUEST_CACHE, else /var/tmp/passt-py-guest.

    Not under /tmp: the qrap tests give QEMU a private /tmp (C qrap only looks
    for /tmp/passt_N.socket), which would hide a cache there, or a checkout.
    """
    env = os.environ.get("PASST_PY_GUEST_CACHE")
    if env:
        return Path(env)
    return Path("/var/tmp/passt-py-guest")


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_APT_ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def _candidates(*pkgs: str) -> dict[str, str]:
    """Candidate version of each package apt knows, from one `apt-cache policy` run."""
    out = _run(["apt-cache", "policy", *pkgs])
    found = re.findall(r"^(\S+):\n(?:[ \t]+.*\n)*?[ \t]+Candidate:[ \t]*(\S+)", out, re.M)
    return {pkg: ver for pkg, ver in found if ver != "(none)"}


def _kernel_dependency() -> str | None:
    out = _run(["apt-cache", "depends", KERNEL_META])
    m = re.search(r"^\s*\|?Depends:\s*(linux-image-\S+)", out, re.M)
    return m.group(1) if m else None


def resolve_packages() -> tuple[tuple[str, str], tuple[str, str]]:
    """((kernel package, version), (busybox-static, version)), running `apt-get update`
    once if the package lists do not know them yet (fresh machine)."""
    for attempt in range(2):
        try:
            kpkg = _kernel_dependency()
            versions = _candidates(kpkg, BUSYBOX_PKG) if kpkg else {}
            kver, bver = versions.get(kpkg or ""), versions.get(BUSYBOX_PKG)
        except GuestBuildError:
            kpkg = kver = bver = None
        if kpkg and kver and bver:
            return (kpkg, kver), (BUSYBOX_PKG, bver)
        if attempt == 0:
            _run(["apt-get", "update", "-q"])
    raise GuestBuildError(f"apt cannot resolve {KERNEL_META} and {BUSYBOX_PKG}")


def _content_hash() -> str:
    h = hashlib.sha256()
    for part in (INIT, UDHCPC_SCRIPT, ",".join(ROOT_MODULES), str(FORMAT)):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:10]


def cache_key(kernel: tuple[str, str], busybox: tuple[str, str]) -> str:
    raw = f"{kernel[0]}_{kernel[1]}-bb{busybox[1]}-{_content_hash()}"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", raw)


# -- kernel modules -----------------------------------------------------------------

def _modinfo(data: bytes) -> dict[str, str]:
    """key=value pairs of the ELF64 .modinfo section of a kernel module."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise GuestBuildError("not an ELF64 kernel module")
    e_shoff, = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _t, _f, _a, off, size = struct.unpack_from("<IIQQQQ", data, e_shoff + i * e_shentsize)
        return name, off, size

    _, stroff, _ = section(e_shstrndx)
    for i in range(e_shnum):
        name, off, size = section(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name:end] == b".modinfo":
            info: dict[str, str] = {}
            for item in data[off:off + size].split(b"\0"):
                key, sep, value = item.partition(b"=")
                if sep:
                    info.setdefault(key.decode(), value.decode())
            return info
    return {}


def _read_module(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(raw)
    if path.suffix == ".zst":
        # busybox insmod cannot load compressed modules; Python 3.11 has no zstd.
        return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    return raw


def _module_index(moddir: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for p in moddir.rglob("*.ko*"):
        name = p.name.split(".ko")[0].replace("-", "_")
        index[name] = p
    return index


def resolve_modules(moddir: Path, roots: tuple[str, ...] = ROOT_MODULES
                    ) -> list[tuple[str, bytes]]:
    """(name, uncompressed .ko) for roots and their dependencies, dependencies first."""
    index = _module_index(moddir)
    builtin_file = moddir / "modules.builtin"
    builtin = set()
    if builtin_file.exists():
        builtin = {Path(line).name.split(".ko")[0].replace("-", "_")
                   for line in builtin_file.read_text().split()}
    ordered: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        if name in chain:
            raise GuestBuildError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        if name not in index:
            raise GuestBuildError(f"module {name} not found under {moddir}")
        data = _read_module(index[name])
        for dep in filter(None, _modinfo(data).get("depends", "").split(",")):
            visit(dep, chain + (name,))
        seen.add(name)
        ordered.append((name, data))

    for root in roots:
        visit(root, ())
    return ordered


# -- the image ----------------------------------------------------------------------

def _initramfs(busybox: bytes, modules: list[tuple[str, bytes]]) -> bytes:
    w = CpioWriter()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run",
              "root", "etc/udhcpc", "lib/modules", "usr/share/udhcpc"):
        w.directory(d)
    w.directory("tmp", 0o1777)
    w.char_device("dev/console", 5, 1)
    w.char_device("dev/null", 1, 3, 0o666)
    w.file("bin/busybox", busybox, 0o755)
    w.symlink("bin/sh", "busybox")
    w.file("init", INIT.encode(), 0o755)
    w.file("etc/udhcpc/default.script", UDHCPC_SCRIPT.encode(), 0o755)
    w.symlink("usr/share/udhcpc/default.script", "/etc/udhcpc/default.script")
    w.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    w.file("etc/group", b"root:x:0:\n")
    w.file("etc/hosts", b"127.0.0.1 localhost guest\n::1 localhost\n")
    for name, data in modules:
        w.file(f"lib/modules/{name}.ko", data)
    w.file(MODULE_LIST, "".join(f"{name}\n" for name, _ in modules).encode())
    return w.getvalue()


def _download(workdir: Path, pkg: str, version: str) -> Path:
    _run(["apt-get", "download", "-q", f"{pkg}={version}"], cwd=workdir)
    debs = list(workdir.glob(f"{pkg}_*.deb"))
    if len(debs) != 1:
        raise GuestBuildError(f"apt-get download {pkg}={version} left {debs}")
    return debs[0]


def _build(stage: Path, kernel: tuple[str, str], busybox: tuple[str, str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="passt-guest-build-") as tmp:
        work = Path(tmp)
        kdeb = _download(work, *kernel)
        bdeb = _download(work, *busybox)
        kroot, broot = work / "kernel", work / "busybox"
        _run(["dpkg", "-x", str(kdeb), str(kroot)])
        _run(["dpkg", "-x", str(bdeb), str(broot)])
        vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
        moddirs = sorted((kroot / "lib/modules").iterdir())
        if len(vmlinuz) != 1 or len(moddirs) != 1:
            raise GuestBuildError(f"unexpected layout in {kdeb.name}: {vmlinuz} {moddirs}")
        modules = resolve_modules(moddirs[0])
        shutil.copyfile(vmlinuz[0], stage / "vmlinuz")
        image = _initramfs((broot / "bin/busybox").read_bytes(), modules)
        (stage / "initramfs.cpio").write_bytes(image)
    return {
        "kernel_package": f"{kernel[0]}={kernel[1]}",
        "kernel_release": moddirs[0].name,
        "busybox_package": f"{busybox[0]}={busybox[1]}",
        "modules": [name for name, _ in modules],
    }


def _image(path: Path) -> GuestImage:
    info = json.loads((path / "info.json").read_text())
    return GuestImage(path / "vmlinuz", path / "initramfs.cpio", info["kernel_package"])


def build_guest(cache_dir: Path | None = None) -> GuestImage:
    """Return the cached guest for the current Debian kernel, building it if needed."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    kernel, busybox = resolve_packages()
    final = cache_dir / cache_key(kernel, busybox)
    if (final / "info.json").exists():
        return _image(final)

    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock:
        # The lock only avoids downloading twice; the rename below is what keeps
        # readers (and a builder on a cache dir shared without working locks) safe.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "info.json").exists():
            return _image(final)
        for stale in cache_dir.glob(".build-*"):  # left by a builder that died
            shutil.rmtree(stale, ignore_errors=True)
        stage = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
        try:
            started = time.monotonic()
            info = _build(stage, kernel, busybox)
            info["build_seconds"] = round(time.monotonic() - started, 1)
            (stage / "info.json").write_text(json.dumps(info, indent=2) + "\n")
            stage.chmod(0o755)
            try:
                os.rename(stage, final)
            except OSError:
                if not (final / "info.json").exists():
                    raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return _image(final)
