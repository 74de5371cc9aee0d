"""Shared pieces of the unit tests: a made-up host, its Config, and running a loop briefly.

Nothing here touches the machine's network: the host is described by hand
(addresses from the documentation ranges), so Configs are built without
discovery, and code that must open real sockets towards made-up addresses
runs in `in_fresh_netns` (a thread with a network namespace of its own).
"""

from __future__ import annotations

import fcntl
import socket
import struct
import threading
import time
from collections.abc import Callable
from ipaddress import IPv6Address

from common.conf import Config, build_config
from common.fwd import forward_config
from common.hostinfo import FamilyInfo, HostInfo
from common.loop import Loop
from common.packet.checksum import csum_add, csum_finish
from common.packet.ethernet import ETH_P_IP, ETH_P_IPV6, parse_ethernet
from common.packet.ipv4 import parse_ipv4
from common.packet.ipv6 import parse_ipv6
from pasta.ns import CLONE_NEWNET, unshare

HOST4, GW4, DNS4 = "192.0.2.10", "192.0.2.1", "192.0.2.53"
HOST6, GW6 = "2001:db8:1::10", "fe80::1"
OUR_MAC = bytes.fromhex("021122334455")
GUEST_MAC = bytes.fromhex("525400123456")
GUEST_LL = IPv6Address("fe80::5054:ff:fe12:3456")
BCAST = b"\xff" * 6


def make_conf(mode: str = "passt", **opts) -> Config:
    """A Config for `mode` on the made-up host, with command-line options `opts`."""
    host = HostInfo(
        v4=FamilyInfo("eth0", GW4, ((HOST4, 24),)),
        v6=FamilyInfo("eth0", GW6, ((HOST6, 64),), link_local="fe80::2"),
        macs={"eth0": "02:11:22:33:44:55"}, nameservers=(DNS4,), search=("example.test",))
    return build_config(mode, opts, host, forward_parser=forward_config)


def wait_until(pred: Callable[[], object], timeout: float = 5.0, *, what: str = "condition",
               interval: float = 0.005, step: Callable[[], object] | None = None):
    """Wait for a condition, not for a time: pred() until it is true (its value returned),
    between two tries step() (default: sleep `interval`); AssertionError naming `what`
    after `timeout` seconds.  The one helper tests synchronise with (integration's
    `wait_for` is this one)."""
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        if step is None:
            time.sleep(interval)
        else:
            step()


def run_until(loop: Loop, pred: Callable[[], object], timeout: float = 5.0, *,
              what: str = "condition"):
    """Run the loop until pred() is true (wait_until, the loop running between tries)."""
    return wait_until(pred, timeout, what=what, step=lambda: spin(loop, 0.002))


def spin(loop: Loop, seconds: float = 0.05) -> None:
    """Run the loop for a while (it dispatches socket events and timers)."""
    loop.call_later(seconds, lambda: loop.stop(0))
    loop.run()
    loop._exit_code = None      # let the next spin run again


class FakeTap:
    """Keeps frames; completes partial checksums like the kernel (skb_checksum_help)."""
    headroom = 16

    def __init__(self, offload: bool = False) -> None:
        self.csum_offload = offload
        self.frames: list[bytes] = []
        self.partial: list[tuple[int, int]] = []
        self.frames_in = self.frames_out = self.dropped_out = 0

    def fileno(self) -> int:
        return -1

    def send(self, buf, start, end, csum_start=0, csum_offset=0, gso=0, gso_size=0):
        frame = bytearray(buf[start:end])
        if csum_start:
            self.partial.append((csum_start, csum_offset))
            csum = csum_finish(csum_add(frame[csum_start:])) or 0xFFFF
            struct.pack_into("!H", frame, csum_start + csum_offset, csum)
        self.frames.append(bytes(frame))
        self.frames_out += 1
        return True

    def send_frame(self, frame) -> bool:
        self.frames.append(bytes(frame))
        self.frames_out += 1
        return True


class BatchTap(FakeTap):
    """A FakeTap that also takes a run of frames in one call (`send_many`, as passt's
    stream socket does), and records how many came in each."""

    def __init__(self) -> None:
        super().__init__(False)
        self.batches: list[int] = []

    def send_many(self, frames) -> int:
        self.batches.append(len(frames))
        for buf, start, end in frames:
            self.send(buf, start, end)
        return 0


def parse_frame(frame: bytes):
    """(ip header, l4 bytes) after checking Ethernet and the IP header."""
    eth, payload = parse_ethernet(frame)
    assert eth.dst == GUEST_MAC and eth.src == OUR_MAC
    if eth.ethertype == ETH_P_IP:
        ip, l4 = parse_ipv4(payload, verify_checksum=True)
        return ip, bytes(l4)
    assert eth.ethertype == ETH_P_IPV6
    ip, l4 = parse_ipv6(payload)
    return ip, bytes(l4)


SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 1


def in_fresh_netns(fn, ping_groups: str | None = None, timeout: float = 30):
    """fn() in a thread with a network namespace of its own (at most `timeout` s)."""
    out: dict = {}

    def body() -> None:
        try:
            unshare(CLONE_NEWNET)           # this thread only
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                ifr = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH14x", b"lo", 0))
                flags = struct.unpack_from("16sH", ifr)[1]
                fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
            if ping_groups is not None:
                # /proc/sys/net is the namespace of whoever opens it: this thread
                with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
                    f.write(ping_groups)
            out["value"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            out["error"] = exc

    t = threading.Thread(target=body)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"{fn!r} still running after {timeout} s")
    if "error" in out:
        raise out["error"]
    return out.get("value")
