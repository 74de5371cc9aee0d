"""A guest that writes raw Ethernet frames: what an attacker controls, byte for byte.

Two ways in, one interface (`send(frame)`, `recv(timeout)`, `close()`):

- `PasstGuest`: connects to passt's UNIX socket and speaks its stream
  protocol (each frame after its 4-byte big-endian length), as QEMU does.
- `TapGuest`: for pasta, an AF_PACKET socket on the tap interface inside the
  namespace.  What we send there leaves the namespace's interface, so pasta
  reads it from the tap exactly as if the namespace's kernel had sent it;
  what pasta writes arrives on the same socket.  The socket lives in a child
  process started in the namespace (this file run as a script: `pipe IFNAME`),
  which relays hex lines: stdin -> frames out, frames in -> stdout.

The frame builders below make the probes the boundary tests send.
"""

from __future__ import annotations

import os
import queue
import select
import socket
import struct
import subprocess
import sys
import threading
import time

from common.packet.ethernet import ETH_P_IP, ETH_P_IPV6, build_ethernet
from common.packet.frames import build_ipv4_frame, build_ipv6_frame, udp4_frame, udp6_frame
from common.packet.icmp import build_icmp4, build_icmp6
from common.packet.tcp import SYN, TcpOptions, build_tcp4, build_tcp6

STREAM_LEN = struct.Struct("!I")
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


class PasstGuest:
    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._buf = b""

    def send(self, frame: bytes) -> None:
        self.sock.sendall(STREAM_LEN.pack(len(frame)) + frame)

    def recv(self, timeout: float) -> list[bytes]:
        """Every frame that arrives within `timeout` seconds."""
        frames = []
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return frames
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                continue
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return frames
            self._buf += chunk
            while len(self._buf) >= 4:
                (n,) = STREAM_LEN.unpack_from(self._buf)
                if len(self._buf) < 4 + n:
                    break
                frames.append(self._buf[4:4 + n])
                self._buf = self._buf[4 + n:]

    def close(self) -> None:
        self.sock.close()


class TapGuest:
    def __init__(self, netns_cmd: list[str], ifname: str) -> None:
        self.proc = subprocess.Popen([*netns_cmd, sys.executable, __file__, "pipe", ifname],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": _root()})
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            raise AssertionError(f"raw guest did not start: {ready}{self.proc.stderr.read()}")
        self._q: queue.Queue[bytes] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._q.put(bytes.fromhex(line.strip()))

    def send(self, frame: bytes) -> None:
        self.proc.stdin.write(frame.hex() + "\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float) -> list[bytes]:
        frames = []
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                frames.append(self._q.get(timeout=left))
            except queue.Empty:
                break
        return frames

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3)
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pipe(ifname: str) -> None:
    """The namespace side of `TapGuest`."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((ifname, 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    print("ready", flush=True)
    stdin = sys.stdin.fileno()
    buf = b""
    while True:
        r, _, _ = select.select([s, stdin], [], [])
        if s in r:
            data, addr = s.recvfrom(1 << 16)
            if addr[2] != PACKET_OUTGOING:
                sys.stdout.write(data.hex() + "\n")
                sys.stdout.flush()
        if stdin in r:
            chunk = os.read(stdin, 1 << 20)
            if not chunk:
                return
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.strip():
                    s.send(bytes.fromhex(line.decode()))


# ---------------------------------------------------------------- probes


def packed(addr: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)


def tcp_syn(dst_mac: bytes, src_mac: bytes, src: str, dst: str, sport: int, dport: int,
            seq: int = 1000) -> bytes:
    s, d = packed(src), packed(dst)
    opts = TcpOptions(mss=1400)
    if len(s) == 16:
        return build_ipv6_frame(dst_mac, src_mac, s, d, 6,
                                build_tcp6(s, d, sport, dport, seq, 0, SYN, 65535, options=opts))
    return build_ipv4_frame(dst_mac, src_mac, s, d, 6,
                            build_tcp4(s, d, sport, dport, seq, 0, SYN, 65535, options=opts))


def udp(dst_mac: bytes, src_mac: bytes, src: str, dst: str, sport: int, dport: int,
        payload: bytes) -> bytes:
    s, d = packed(src), packed(dst)
    if len(s) == 16:
        return udp6_frame(dst_mac, src_mac, s, d, sport, dport, payload)
    return udp4_frame(dst_mac, src_mac, s, d, sport, dport, payload)


def echo_request(dst_mac: bytes, src_mac: bytes, src: str, dst: str, ident: int,
                 seq: int = 1, body: bytes = b"boundary") -> bytes:
    s, d = packed(src), packed(dst)
    rest = struct.pack("!HH", ident, seq)
    if len(s) == 16:
        return build_ipv6_frame(dst_mac, src_mac, s, d, 58, build_icmp6(s, d, 128, 0, rest, body))
    return build_ipv4_frame(dst_mac, src_mac, s, d, 1, build_icmp4(8, 0, rest, body))


def is_echo_reply(frame: bytes, ident: int) -> bool:
    """An ICMP or ICMPv6 echo reply carrying `ident` (no extension headers)."""
    et = frame[12] << 8 | frame[13]
    if et == ETH_P_IP and len(frame) >= 42 and frame[23] == 1:
        l4 = 14 + (frame[14] & 0x0F) * 4
        return frame[l4] == 0 and frame[l4 + 4] << 8 | frame[l4 + 5] == ident
    if et == ETH_P_IPV6 and len(frame) >= 62 and frame[20] == 58:
        return frame[54] == 129 and frame[58] << 8 | frame[59] == ident
    return False


def tcp_flags_to(frame: bytes, dport: int) -> int | None:
    """The TCP flags of a segment to guest port `dport`, or None."""
    et = frame[12] << 8 | frame[13]
    if et == ETH_P_IP and len(frame) >= 54 and frame[23] == 6:
        l4 = 14 + (frame[14] & 0x0F) * 4
    elif et == ETH_P_IPV6 and len(frame) >= 74 and frame[20] == 6:
        l4 = 54
    else:
        return None
    if frame[l4 + 2] << 8 | frame[l4 + 3] != dport:
        return None
    return frame[l4 + 13]


__all__ = ["PasstGuest", "TapGuest", "build_ethernet", "echo_request", "is_echo_reply",
           "packed", "tcp_flags_to", "tcp_syn", "udp"]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "pipe":
        _pipe(sys.argv[2])
    else:
        sys.exit(f"usage: {sys.argv[0]} pipe IFNAME")
