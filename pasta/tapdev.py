"""Creating the tap interface in the namespace: /dev/net/tun with TUNSETIFF.

Run inside the target namespace (through `NsThread.call`): the interface
appears in the network namespace of the thread that creates it.  We ask for
IFF_TAP|IFF_NO_PI and, by default, IFF_VNET_HDR with checksum and TSO
offloads, so that frames in both directions can carry partial checksums and
the namespace may hand us TCP segments larger than the MTU.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
IFNAMSIZ = 16


class TapError(Exception):
    """The tap interface cannot be created; the message is one line."""


def open_tap(name: str, vnet_hdr: bool = True) -> tuple[int, str]:
    """Create tap `name` in the calling thread's namespace; returns (fd, name)."""
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or name in (".", ".."):
        raise TapError(f"invalid interface name: {name!r}")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TapError(f"cannot open /dev/net/tun: {exc.strerror}") from None
    try:
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        try:
            ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise TapError(f"interface {name} already exists in the namespace") from None
            if exc.errno == errno.EPERM:
                raise TapError(f"no permission to create tap {name} in the namespace") from None
            raise TapError(f"cannot create tap {name}: {exc.strerror}") from None
        if vnet_hdr:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", 10))
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
        return fd, ifr[:IFNAMSIZ].rstrip(b"\0").decode()
    except BaseException:
        os.close(fd)
        raise
