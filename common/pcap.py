"""Packet capture of guest-side frames in classic pcap format (tshark/wireshark read it).

Every frame that crosses the tap, in both directions, is written whole
(snap length 256 KiB, larger than any frame we handle), with a microsecond
timestamp.  Writes are plain blocking writes to a local file: capture is a
debugging aid and is allowed to slow the data path down.
"""

from __future__ import annotations

import os
import struct
import time

from common.files import open_for_write

PCAP_MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
SNAPLEN = 262144
_GLOBAL = struct.Struct("=IHHiIII")
_RECORD = struct.Struct("=IIII")


class Pcap:
    def __init__(self, path: str) -> None:
        self.fd = open_for_write(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "capture file")
        os.write(self.fd, _GLOBAL.pack(PCAP_MAGIC, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET))
        self._hdr = bytearray(_RECORD.size)
        self.frames = 0

    def write(self, frame: bytes | bytearray | memoryview) -> None:
        now = time.time()
        sec = int(now)
        length = len(frame)
        _RECORD.pack_into(self._hdr, 0, sec, int((now - sec) * 1e6), length, length)
        os.writev(self.fd, [self._hdr, frame])
        self.frames += 1

    def close(self) -> None:
        os.close(self.fd)
