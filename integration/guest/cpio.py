"""Writer for "newc" cpio archives, the format the Linux kernel unpacks as initramfs.

Owns only the byte format: a 110-byte ASCII header (magic 070701, thirteen 8-digit hex
fields), the NUL-terminated name, the data, each padded to 4 bytes, and a TRAILER!!!
entry. Parent directories are emitted automatically, once, before their contents.
Archives may be concatenated; the kernel unpacks them in order, later files replacing
earlier ones.
"""

from __future__ import annotations

import stat
from pathlib import PurePosixPath

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


class CpioWriter:
    """Collects entries in memory and renders one archive with `getvalue()`."""

    def __init__(self, first_inode: int = 1, mtime: int = 0) -> None:
        self._out = bytearray()
        self._ino = first_inode
        self._mtime = mtime
        self._dirs: set[str] = set()
        self._closed = False

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1,
               rdev: tuple[int, int] = (0, 0)) -> None:
        if self._closed:
            raise ValueError("archive already finished")
        encoded = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, nlink, self._mtime, len(data),
            0, 0, rdev[0], rdev[1], len(encoded), 0,
        )
        self._ino += 1
        self._out += _MAGIC + b"".join(b"%08X" % f for f in fields)
        self._out += encoded + b"\0" * _pad4(110 + len(encoded))
        self._out += data + b"\0" * _pad4(len(data))

    @staticmethod
    def _norm(path: str) -> str:
        p = PurePosixPath("/") / path
        return str(p).lstrip("/")

    def _parents(self, name: str) -> None:
        parent = PurePosixPath(name).parent
        for d in reversed([parent, *parent.parents]):
            self.directory(str(d))

    def directory(self, path: str, mode: int = 0o755) -> None:
        name = self._norm(path)
        if not name or name in self._dirs:
            return
        self._parents(name)
        self._dirs.add(name)
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        name = self._norm(path)
        self._parents(name)
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        name = self._norm(path)
        self._parents(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        name = self._norm(path)
        self._parents(name)
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def getvalue(self) -> bytes:
        """Finish the archive (trailer, then zero-padded to 512 bytes) and return it."""
        if not self._closed:
            self._entry(_TRAILER, 0)
            self._closed = True
            self._out += b"\0" * ((512 - len(self._out) % 512) % 512)
        return bytes(self._out)
