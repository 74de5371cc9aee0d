"""Whole Ethernet frames for the responders (ARP, NDP, DHCP, DHCPv6, ICMP errors).

Each builder fills one buffer: Ethernet header, IP header, then the L4 bytes.
The L4 bytes must already carry their checksum (the `build_*` functions of
`udp`, `tcp`, `icmp` do that), except in `udp4_frame`/`udp6_frame`, which
build and checksum the UDP header themselves.
"""

from __future__ import annotations

from common.packet.ethernet import ETH_HLEN, ETH_P_IP, ETH_P_IPV6, pack_ethernet_into
from common.packet.ipv4 import IPPROTO_UDP, IPV4_HLEN, pack_ipv4_into
from common.packet.ipv6 import IPV6_HLEN, pack_ipv6_into
from common.packet.udp import UDP_HLEN, pack_udp4_into, pack_udp6_into

Buffer = bytes | bytearray | memoryview


def build_ipv4_frame(dst_mac: bytes, src_mac: bytes, ip_src: bytes, ip_dst: bytes,
                     proto: int, l4: Buffer, ttl: int = 64) -> bytes:
    buf = bytearray(ETH_HLEN + IPV4_HLEN)
    pack_ethernet_into(buf, 0, dst_mac, src_mac, ETH_P_IP)
    pack_ipv4_into(buf, ETH_HLEN, ip_src, ip_dst, proto, len(l4), ttl=ttl)
    buf += l4
    return bytes(buf)


def build_ipv6_frame(dst_mac: bytes, src_mac: bytes, ip_src: bytes, ip_dst: bytes,
                     next_header: int, l4: Buffer, hop_limit: int = 255) -> bytes:
    buf = bytearray(ETH_HLEN + IPV6_HLEN)
    pack_ethernet_into(buf, 0, dst_mac, src_mac, ETH_P_IPV6)
    pack_ipv6_into(buf, ETH_HLEN, ip_src, ip_dst, next_header, len(l4), hop_limit=hop_limit)
    buf += l4
    return bytes(buf)


def udp4_frame(dst_mac: bytes, src_mac: bytes, ip_src: bytes, ip_dst: bytes,
               sport: int, dport: int, payload: Buffer, ttl: int = 64) -> bytes:
    """Ethernet + IPv4 + UDP around `payload`, both checksums filled in."""
    l4 = ETH_HLEN + IPV4_HLEN
    buf = bytearray(l4 + UDP_HLEN)
    buf += payload
    pack_ethernet_into(buf, 0, dst_mac, src_mac, ETH_P_IP)
    pack_ipv4_into(buf, ETH_HLEN, ip_src, ip_dst, IPPROTO_UDP, UDP_HLEN + len(payload), ttl=ttl)
    pack_udp4_into(buf, l4, ip_src, ip_dst, sport, dport, len(payload))
    return bytes(buf)


def udp6_frame(dst_mac: bytes, src_mac: bytes, ip_src: bytes, ip_dst: bytes,
               sport: int, dport: int, payload: Buffer, hop_limit: int = 255) -> bytes:
    """Ethernet + IPv6 + UDP around `payload`, the UDP checksum filled in."""
    l4 = ETH_HLEN + IPV6_HLEN
    buf = bytearray(l4 + UDP_HLEN)
    buf += payload
    pack_ethernet_into(buf, 0, dst_mac, src_mac, ETH_P_IPV6)
    pack_ipv6_into(buf, ETH_HLEN, ip_src, ip_dst, IPPROTO_UDP, UDP_HLEN + len(payload),
                   hop_limit=hop_limit)
    pack_udp6_into(buf, l4, ip_src, ip_dst, sport, dport, len(payload))
    return bytes(buf)
