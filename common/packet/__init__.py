"""Packet codecs: parse and build the headers passt speaks, and checksums.

Modules, one protocol each:

- `errors`    `MalformedPacket` (a ValueError), raised by every parser.
- `checksum`  Internet checksum: `csum_add`/`csum_finish`/`checksum`,
              pseudo-header sums `pseudo4`/`pseudo6`, `l4_checksum4/6`.
- `ethernet`  Ethernet II header; `ETH_P_*` ethertypes.
- `arp`       Ethernet/IPv4 ARP packets.
- `ipv4`      IPv4 header (options skipped, not parsed); `IPPROTO_ICMP/TCP/UDP`.
- `ipv6`      IPv6 header, extension headers skipped on parse; `IPPROTO_*` numbers.
- `udp`       UDP header and checksum.
- `tcp`       TCP header and options (MSS, window scale, SACK, timestamps).
- `icmp`      ICMP and ICMPv6 messages, error messages quoting the original packet.
- `frames`    whole Ethernet frames (Ethernet + IP + L4) for the responders.

Conventions:

- Pure functions and small slotted records (common.record) over bytes; no I/O, no globals,
  nothing here knows about flows, sockets or the configuration.
- Parsers take `bytes`, `bytearray` or `memoryview` and return
  `(header, payload)` where the payload is a `memoryview` of the input (no
  copy), trimmed to the length the header declares.  Short or inconsistent
  input raises `MalformedPacket` with a one-line reason; nothing else is raised.
  A parser reads only its own header: callers dispatch on ethertype/protocol.
- Addresses inside packets are raw bytes (4 or 16, MACs 6): convert with
  `ipaddress.ip_address(b)` and `.packed`.
- `build_*` returns a new `bytes` with every checksum filled in; `pack_*_into`
  writes a header in place into a caller's buffer at an offset (hot paths:
  one preallocated buffer, payload written first, headers packed in front).
- Builders raise ValueError on arguments that cannot be encoded (address of
  the wrong size, payload too long, options over 40 bytes).
"""
