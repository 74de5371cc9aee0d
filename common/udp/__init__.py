"""UDP translation between the guest and host sockets (see `handler` for the design).

- `frame`: datagram frames to the guest in preallocated buffers (UDP, ICMP);
- `icmperr`: ICMP errors from the host's error queue, rebuilt for the guest;
- `handler`: `UdpHandler` and the sockets of forwarded ports (`udp_listener`).
"""

from common.udp.handler import UdpHandler, UdpListener, bind_udp, udp_listener

__all__ = ["UdpHandler", "UdpListener", "bind_udp", "udp_listener"]
