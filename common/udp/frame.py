"""Datagram frames to the guest (UDP and ICMP echo replies) in preallocated buffers.

One buffer per address family, laid out as

    [tap headroom][Ethernet][IPv4 or IPv6][L4 header][payload ...]

and large enough for the largest IP packet, so a socket read never
truncates.  A handler reads the datagram straight into the buffer
(`udp_payload4/6` behind an 8-byte UDP header; `l4_4/6` for a whole ICMP
message as a ping socket returns it), then `send_udp`/`send_icmp` packs the
headers in front of it with `struct.pack_into` and hands the buffer to the
tap: no byte is copied in Python.

`FlowHeader` (common/flowheader) holds what every frame of one flow shares
(addresses, ports and the partial sums that do not change), built once per
flow, so each frame costs two or three pack_into calls and a few additions.

Checksums: when the tap takes partial checksums (pasta's virtio-net header),
the L4 checksum field carries the folded pseudo-header sum (zero for ICMPv4,
which has no pseudo-header) and the tap is told where the checksum starts
and where it goes; otherwise (passt) the full checksum is computed here.
"""

from __future__ import annotations

import struct

from common.flowheader import PROTO_UDP, FlowHeader, fold
from common.packet.checksum import csum_add, csum_finish
from common.packet.ethernet import ETH_P_IP, ETH_P_IPV6, frame_buffer
from common.tap import TapBackend

ETH_LEN = 14
UDP_LEN = 8
MAX_IP_PACKET = 65535

_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_UDP = struct.Struct("!HHHH")
_U16 = struct.Struct("!H")


class DatagramWriter:
    def __init__(self, tap: TapBackend, our_mac: bytes, guest) -> None:
        self.tap = tap
        self.guest = guest                   # GuestState: the destination MAC may change
        self.offload = tap.csum_offload
        h = tap.headroom
        self.eth = h
        self.l3 = h + ETH_LEN
        self.l4_off4 = self.l3 + 20
        self.l4_off6 = self.l3 + 40
        self.buf4 = frame_buffer(self.l3 + MAX_IP_PACKET, h, our_mac, ETH_P_IP)
        self.buf6 = frame_buffer(self.l4_off6 + MAX_IP_PACKET, h, our_mac, ETH_P_IPV6)
        v4, v6 = memoryview(self.buf4), memoryview(self.buf6)
        self.view4, self.view6 = v4, v6
        self.l4_4 = v4[self.l4_off4:]
        self.l4_6 = v6[self.l4_off6:]
        self.udp_payload4 = v4[self.l4_off4 + UDP_LEN:]
        self.udp_payload6 = v6[self.l4_off6 + UDP_LEN:]
        self.frames = 0
        self._mac = b""                      # the destination MAC the buffers carry

    def _stamp(self, mac: bytes) -> None:
        """Write the guest's (new) MAC address into both buffers, once per change."""
        for buf in (self.buf4, self.buf6):
            buf[self.eth:self.eth + 6] = mac
        self._mac = mac

    def _ip(self, buf: bytearray, hdr: FlowHeader, l4_len: int) -> None:
        mac = self.guest.mac
        if mac is not self._mac:             # GuestState replaces it when it changes
            self._stamp(mac)
        if hdr.v6:
            _IP6.pack_into(buf, self.l3, 0x60000000, l4_len, hdr.proto, 64, hdr.src, hdr.dst)
        else:
            total = 20 + l4_len
            _IP4.pack_into(buf, self.l3, 0x45, 0, total, 0, 0x4000, 64, hdr.proto,
                           fold(hdr.ip_sum + total) ^ 0xFFFF, hdr.src, hdr.dst)

    def send_udp(self, hdr: FlowHeader, payload_len: int) -> bool:
        """Send a datagram whose payload is already in udp_payload4/6."""
        # `_ip` written out, and each sum of two folded 16-bit values folds in one step:
        # this is every datagram's path
        ulen = UDP_LEN + payload_len
        if hdr.v6:
            buf, l4, view = self.buf6, self.l4_off6, self.view6
            _IP6.pack_into(buf, self.l3, 0x60000000, ulen, PROTO_UDP, 64, hdr.src, hdr.dst)
        else:
            buf, l4, view = self.buf4, self.l4_off4, self.view4
            total = 20 + ulen
            s = hdr.ip_sum + total
            _IP4.pack_into(buf, self.l3, 0x45, 0, total, 0, 0x4000, 64, PROTO_UDP,
                           ((s & 0xFFFF) + (s >> 16)) ^ 0xFFFF, hdr.src, hdr.dst)
        mac = self.guest.mac
        if mac is not self._mac:
            self._stamp(mac)
        s = hdr.pseudo_sum + ulen
        pseudo = (s & 0xFFFF) + (s >> 16)
        end = l4 + ulen
        self.frames += 1
        if self.offload:
            _UDP.pack_into(buf, l4, hdr.sport, hdr.dport, ulen, pseudo)
            return self.tap.send(buf, self.eth, end, l4 - self.eth, 6)
        _UDP.pack_into(buf, l4, hdr.sport, hdr.dport, ulen, 0)
        _U16.pack_into(buf, l4 + 6, csum_finish(csum_add(view[l4:end], pseudo)) or 0xFFFF)
        return self.tap.send(buf, self.eth, end)

    def send_icmp(self, hdr: FlowHeader, msg_len: int) -> bool:
        """Send an ICMP/ICMPv6 message already in l4_4/6; its checksum is filled here."""
        if hdr.v6:
            buf, l4, view = self.buf6, self.l4_off6, self.view6
        else:
            buf, l4, view = self.buf4, self.l4_off4, self.view4
        self._ip(buf, hdr, msg_len)
        end = l4 + msg_len
        self.frames += 1
        if self.offload:
            _U16.pack_into(buf, l4 + 2, fold(hdr.pseudo_sum + msg_len) if hdr.v6 else 0)
            return self.tap.send(buf, self.eth, end, l4 - self.eth, 2)
        _U16.pack_into(buf, l4 + 2, 0)
        pseudo = hdr.pseudo_sum + msg_len if hdr.v6 else 0
        _U16.pack_into(buf, l4 + 2, csum_finish(csum_add(view[l4:end], pseudo)))
        return self.tap.send(buf, self.eth, end)
