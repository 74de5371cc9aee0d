"""The vhost-user wire format: message header, request numbers, payload layouts, feature bits.

Sans-I/O: bytes in, values out, and the reverse.  Numbers are in the host's
byte order on the wire (the protocol says "machine native"); the rings in
guest memory are little-endian (VIRTIO 1.x), which this implementation
requires of the host too (see `virtqueue`).

A message is a 12-byte header (request, flags, payload size) and a payload
whose layout depends on the request.  Flags carry the protocol version (1)
in bits 0-1, REPLY (bit 2) on everything the back-end sends, and NEED_REPLY
(bit 3) on requests the front-end wants acknowledged (with REPLY_ACK).
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
PAYLOAD_MAX = 4096            # the largest payload we accept (GET_CONFIG's is 256 + 12)
FDS_MAX = 8                   # VHOST_MEMORY_BASELINE_NREGIONS: fds per message

U64 = struct.Struct("=Q")
STATE = struct.Struct("=II")                 # vring state: index, num
ADDR = struct.Struct("=IIQQQQ")              # index, flags, desc, used, avail, log
MEM_HEADER = struct.Struct("=II")            # nregions, padding
REGION = struct.Struct("=QQQQ")              # guest address, size, user address, mmap offset
CONFIG_HEADER = struct.Struct("=III")        # offset, size, flags
DEVICE_STATE = struct.Struct("=II")          # transfer direction, migration phase
LOG = struct.Struct("=QQ")                   # dirty log: mmap size, mmap offset

VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8
VRING_F_LOG = 1 << 0                         # SET_VRING_ADDR flags: log the used ring's writes


# front-end requests
class Req:
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


REQUEST_NAMES = {v: k for k, v in vars(Req).items() if not k.startswith("_")}


def request_name(req: int) -> str:
    return REQUEST_NAMES.get(req, f"request {req}")


# virtio and vhost feature bits (VIRTIO 1.2, section 5.1.3 and 6)
class F:
    NET_CSUM = 0               # device takes partially checksummed frames (guest TX)
    NET_GUEST_CSUM = 1         # driver takes partially checksummed frames (guest RX)
    NET_MTU = 3
    NET_MAC = 5
    NET_GUEST_TSO4 = 7
    NET_GUEST_TSO6 = 8
    NET_GUEST_ECN = 9
    NET_GUEST_UFO = 10
    NET_HOST_TSO4 = 11
    NET_HOST_TSO6 = 12
    NET_HOST_ECN = 13
    NET_HOST_UFO = 14
    NET_MRG_RXBUF = 15
    NET_STATUS = 16
    NOTIFY_ON_EMPTY = 24
    LOG_ALL = 26               # VHOST_F_LOG_ALL: dirty logging for migration
    ANY_LAYOUT = 27
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    PROTOCOL_FEATURES = 30     # VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34


class PF:
    """vhost-user protocol feature bits."""
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CONFIG = 9
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    DEVICE_STATE = 19


def bits(*numbers: int) -> int:
    out = 0
    for n in numbers:
        out |= 1 << n
    return out


class ProtocolError(Exception):
    """A message we cannot make sense of: the connection ends (one log line)."""


class Message:
    """One front-end request; `fds` are the descriptors that came with it."""
    __slots__ = ("request", "flags", "payload", "fds")

    def __init__(self, request: int, flags: int, payload: bytes,
                 fds: list[int] | None = None) -> None:
        self.request = request
        self.flags = flags
        self.payload = payload
        self.fds = fds if fds is not None else []

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        return request_name(self.request)

    def u64(self) -> int:
        if len(self.payload) < U64.size:
            raise ProtocolError(f"{self.name}: payload of {len(self.payload)} bytes, "
                                f"need {U64.size}")
        return U64.unpack_from(self.payload)[0]

    def state(self) -> tuple[int, int]:
        if len(self.payload) < STATE.size:
            raise ProtocolError(f"{self.name}: payload of {len(self.payload)} bytes, "
                                f"need {STATE.size}")
        return STATE.unpack_from(self.payload)

    def addr(self) -> tuple[int, int, int, int, int, int]:
        if len(self.payload) < ADDR.size:
            raise ProtocolError(f"{self.name}: payload of {len(self.payload)} bytes, "
                                f"need {ADDR.size}")
        return ADDR.unpack_from(self.payload)

    def log(self) -> tuple[int, int]:
        """SET_LOG_BASE: (mmap size, mmap offset) of the dirty log."""
        if len(self.payload) < LOG.size:
            raise ProtocolError(f"{self.name}: payload of {len(self.payload)} bytes, "
                                f"need {LOG.size}")
        return LOG.unpack_from(self.payload)

    def transfer(self) -> tuple[int, int]:
        """SET_DEVICE_STATE_FD: (direction, phase)."""
        if len(self.payload) < DEVICE_STATE.size:
            raise ProtocolError(f"{self.name}: payload of {len(self.payload)} bytes, "
                                f"need {DEVICE_STATE.size}")
        return DEVICE_STATE.unpack_from(self.payload)

    def regions(self) -> list[tuple[int, int, int, int]]:
        """SET_MEM_TABLE: (guest address, size, user address, mmap offset) per region."""
        if len(self.payload) < MEM_HEADER.size:
            raise ProtocolError(f"{self.name}: no region count")
        n, _pad = MEM_HEADER.unpack_from(self.payload)
        if n > FDS_MAX:
            raise ProtocolError(f"{self.name}: {n} regions (at most {FDS_MAX})")
        if len(self.payload) < MEM_HEADER.size + n * REGION.size:
            raise ProtocolError(f"{self.name}: {n} regions in {len(self.payload)} bytes")
        return [REGION.unpack_from(self.payload, MEM_HEADER.size + i * REGION.size)
                for i in range(n)]

    def take_fds(self) -> list[int]:
        """The descriptors, now owned by the caller (they are not closed with the message)."""
        fds, self.fds = self.fds, []
        return fds


def header(request: int, flags: int, size: int) -> bytes:
    return HEADER.pack(request, flags, size)


def parse_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """(request, flags, size), validated: a wrong version or size ends the connection."""
    request, flags, size = HEADER.unpack_from(data)
    if flags & VERSION_MASK != VERSION:
        raise ProtocolError(f"{request_name(request)}: protocol version "
                            f"{flags & VERSION_MASK}, we speak {VERSION}")
    if size > PAYLOAD_MAX:
        raise ProtocolError(f"{request_name(request)}: payload of {size} bytes "
                            f"(at most {PAYLOAD_MAX})")
    return request, flags, size


def reply(request: int, payload: bytes) -> bytes:
    return header(request, VERSION | FLAG_REPLY, len(payload)) + payload


def reply_u64(request: int, value: int) -> bytes:
    return reply(request, U64.pack(value & 0xFFFFFFFFFFFFFFFF))


def request(req: int, payload: bytes = b"", *, need_reply: bool = False) -> bytes:
    """A front-end message (for tests and tools that play QEMU)."""
    return header(req, VERSION | (FLAG_NEED_REPLY if need_reply else 0), len(payload)) + payload


def capabilities_json() -> str:
    """What --print-capabilities prints (the vhost-user.json schema's BackendCapabilities)."""
    return '{\n  "type": "net"\n}'
