"""`qrap`: connect QEMU to a passt socket through an inherited file descriptor.

    qrap FDNUM QEMU_CMD [QEMU_ARG...]
    qrap [QEMU_ARG...]

For QEMU before 7.2, which cannot connect to a UNIX socket itself.  qrap
finds a running passt by probing `/tmp/passt_1.socket`, `_2`, ... in order,
as C qrap does: on each socket it sends the same probe as C qrap (an
all-zero ARP request, then an all-zero Neighbor Solicitation, each with its
length) and takes the socket if a frame comes back within 500 ms; a reset
connection (that passt is still busy with a QEMU going away) is retried for
2.5 s.  Exactly one reply frame is read, so the stream QEMU inherits starts
on a frame boundary; any other reply reaches the guest as an ordinary frame
(C qrap only peeks at the reply and leaves it all to the guest).  Both C
passt and ours answer the ARP probe.

The socket becomes descriptor FDNUM and QEMU is exec()ed.  The QEMU command
line must then use `-netdev socket,fd=FDNUM` (or `-net socket,fd=FDNUM`):
if no network back-end names that descriptor, the first `-netdev`/`-net`
back-end is turned into it, or one is added with a virtio-net device.
Without FDNUM and QEMU_CMD, QEMU is looked up by its usual names, every
network option is replaced by our own, and FDNUM is 5.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import struct
import sys
import time

from passt.sockpath import SOCKET_MAX, SOCKET_TEMPLATE

DEFAULT_FD = 5
PROBE_TIMEOUT = 0.5
RESET_RETRIES = 50
RESET_DELAY = 0.05
FRAME_MAX = 65535 + 14
NETDEV_ID = "hostnet0"

# C qrap's probe, Ethernet broadcast from broadcast: an ARP request with every
# address zero (who has 0.0.0.0?) ...
_ARP_PROBE = (b"\xff" * 12 + b"\x08\x06"
              + bytes.fromhex("0001080006040001") + b"\0" * 20)
# ... and an ICMPv6 Neighbor Solicitation from ::1 for ::, checksum left zero
_NS_PROBE = (b"\xff" * 12 + b"\x86\xdd"
             + bytes.fromhex("6000000000183aff") + b"\0" * 15 + b"\x01" + b"\0" * 16
             + b"\x87" + b"\0" * 23)
PROBE = b"".join(struct.pack("!I", len(f)) + f for f in (_ARP_PROBE, _NS_PROBE))

# devices C qrap removes when it builds the network options itself
_NIC_DEVICES = ("virtio-net-pci,", "virtio-net-ccw,", "e1000,", "e1000e,", "rtl8139,")


class QrapError(Exception):
    """qrap cannot go on; the message is one line."""


# ---------------------------------------------------------------- probing


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes | None:
    data = b""
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(data))
        except (TimeoutError, BlockingIOError):
            return None
        if not chunk:
            return None
        data += chunk
    return data


def _probe_once(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(PROBE)
        deadline = time.monotonic() + timeout
        head = _recv_exact(sock, 4, deadline)
        if head is None:
            raise OSError("no reply")
        (length,) = struct.unpack("!I", head)
        if not 14 <= length <= FRAME_MAX or _recv_exact(sock, length, deadline) is None:
            raise OSError("malformed reply")
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


def probe_socket(path: str, timeout: float = PROBE_TIMEOUT) -> socket.socket | None:
    """A connected socket if a passt answers the probe at `path`, else None.

    A reset is retried for a while, as C qrap does: a passt still serving a
    QEMU that is just going away turns new connections down that way.
    """
    for _ in range(RESET_RETRIES):
        try:
            return _probe_once(path, timeout)
        except FileNotFoundError:
            return None
        except ConnectionResetError:
            time.sleep(RESET_DELAY)
        except OSError as exc:
            print(f"Probe of {path} failed: {exc.strerror or exc}", file=sys.stderr)
            return None
    print(f"Probe of {path} failed: connection reset", file=sys.stderr)
    return None


def find_passt(template: str = SOCKET_TEMPLATE, count: int = SOCKET_MAX,
               timeout: float = PROBE_TIMEOUT) -> tuple[socket.socket, str]:
    for n in range(1, count + 1):
        path = template.format(n)
        sock = probe_socket(path, timeout)
        if sock is not None:
            return sock, path
    raise QrapError(f"no passt found: nothing answered on {template.format(1)} to "
                    f"{template.format(count)}")


# ---------------------------------------------------------------- QEMU command line


def find_qemu() -> str:
    machine = platform.machine()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    for name in ("qemu-kvm", f"qemu-system-{arch}", "kvm", "/usr/libexec/qemu-kvm"):
        path = shutil.which(name)
        if path:
            return path
    raise QrapError(f"no QEMU found (tried qemu-kvm, qemu-system-{arch}, kvm)")


def _opts(value: str) -> list[str]:
    return value.split(",") if value else []


def _keep(value: str, keys: tuple[str, ...]) -> list[str]:
    return [o for o in _opts(value)[1:] if o.split("=", 1)[0] in keys]


def _names_fd(value: str, fd: int) -> bool:
    parts = _opts(value)
    return bool(parts) and parts[0] == "socket" and f"fd={fd}" in parts[1:]


def patch_args(args: list[str], fd: int) -> list[str]:
    """QEMU arguments whose network back-end is the socket at descriptor `fd`."""
    net_opts = ("-netdev", "--netdev", "-net", "--net", "-nic", "--nic")
    pairs = [(i, args[i + 1]) for i in range(len(args) - 1) if args[i] in net_opts]
    if any(_names_fd(v, fd) for _, v in pairs):
        return list(args)
    out = list(args)
    for i, value in pairs:
        kind = _opts(value)[0] if value else ""
        opt = args[i].lstrip("-")
        if opt == "net" and kind == "nic":
            continue                      # the device half of the old -net pair
        keep = ("id",) if opt == "netdev" else ("id", "name", "vlan", "model", "mac")
        out[i + 1] = ",".join(["socket", f"fd={fd}", *_keep(value, keep)])
        return out
    return out + ["-device", f"virtio-net-pci,netdev={NETDEV_ID}",
                  "-netdev", f"socket,fd={fd},id={NETDEV_ID}"]


def replace_network(args: list[str], fd: int) -> list[str]:
    """As C qrap does without FDNUM: drop every network option, add ours."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        nxt = args[i + 1] if i + 1 < len(args) else ""
        if arg in ("-netdev", "--netdev", "-net", "--net", "-nic", "--nic"):
            skip = True
            continue
        if arg in ("-device", "--device") and nxt.startswith(_NIC_DEVICES):
            skip = True
            continue
        out.append(arg)
    return out + ["-device", f"virtio-net-pci,netdev={NETDEV_ID}",
                  "-netdev", f"socket,fd={fd},id={NETDEV_ID}"]


def command_line(argv: list[str]) -> tuple[int, list[str]]:
    """(FDNUM, QEMU command) from qrap's arguments."""
    if len(argv) >= 2 and argv[0].isdigit():
        fd = int(argv[0])
        if fd < 3:
            raise QrapError(f"invalid FDNUM {fd}: 0, 1 and 2 are QEMU's standard streams")
        return fd, [argv[1], *patch_args(argv[2:], fd)]
    return DEFAULT_FD, [find_qemu(), *replace_network(argv, DEFAULT_FD)]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[1])
        return 0
    try:
        fd, cmd = command_line(args)
        sock, path = find_passt()
    except QrapError as exc:
        print(f"qrap: {exc}", file=sys.stderr)
        return 1
    print(f"Connected to {path}", file=sys.stderr)
    if sock.fileno() != fd:
        os.dup2(sock.fileno(), fd, inheritable=True)
        sock.close()
    else:
        os.set_inheritable(fd, True)
        sock.detach()
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        print(f"qrap: cannot run {cmd[0]}: {exc.strerror}", file=sys.stderr)
        return 127
    return 1   # not reached


if __name__ == "__main__":
    sys.exit(main())
