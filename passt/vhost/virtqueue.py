"""One split virtqueue (VIRTIO 1.2, section 2.7) in guest memory, seen from the device.

Layout, all little-endian, at the addresses SET_VRING_ADDR gave:

    descriptor table  num x {u64 addr, u32 len, u16 flags, u16 next}    (16-byte aligned)
    available ring    u16 flags, u16 idx, u16 ring[num], u16 used_event   (2-byte aligned)
    used ring         u16 flags, u16 idx, {u32 id, u32 len}[num], u16 avail_event (4)

The driver (the guest) puts the head index of each buffer it offers in the
available ring and bumps `idx`; we take heads in order from `last_avail`,
follow each chain of descriptors (`next`, or a table of them with
INDIRECT), and give the buffer back in the used ring with the number of
bytes we wrote into it.  The rings are read through memoryview casts of the
mapped region, so one field is one index operation.

The guest is hostile and owns this memory: every head index, `next` index,
descriptor address, length and flag is checked before use.  A head or next
index out of the table, a chain longer than the queue (a loop), an
available index that moved by more than the queue size, an address in no
memory region, a nested or malformed indirect table, a buffer of the wrong
direction: all raise `RingError`; the owner then stops the queue (one log
line, the error eventfd signalled) and serves nothing more on it until the
front-end configures it again.

Notifications, both ways, honour the driver's wishes: with EVENT_IDX we
signal the call eventfd only when the used index passes the driver's
`used_event`, and ask for kicks by writing `avail_event`; without it the
flags words (NO_INTERRUPT, NO_NOTIFY) do the same coarsely.  Between
publishing an index and reading the other side's event field a full memory
barrier is needed (the driver does the mirror image).  Python has no fence;
acquiring and releasing a lock executes a locked instruction, which on x86
(the only host this supports, see `vhost.device`) is a full barrier.

While the front-end migrates the guest (`log` set, see `vhost.dirtylog`),
every guest page we write is logged after the write: receive buffers as they
are given back, the used ring at each publish and request for kicks.
"""

from __future__ import annotations

import _thread
import itertools
import logging
import os
import struct

from common.ratelimit import RateLimited
from passt.vhost.dirtylog import DirtyLog
from passt.vhost.memory import BadAddress, GuestMemory

log = logging.getLogger("vhost")

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
QUEUE_SIZE_MAX = 32768

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_fence_lock = _thread.allocate_lock()

Piece = tuple[memoryview, int, int]      # region view, offset, length


def fence() -> None:
    """A full memory barrier (a locked instruction on x86)."""
    _fence_lock.acquire()
    _fence_lock.release()


def need_event(event: int, new: int, old: int) -> bool:
    """VIRTIO's vring_need_event: did the index move from `old` to `new` past `event`?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class RingError(Exception):
    """The guest broke this ring's rules: the queue stops."""


class Virtqueue:
    def __init__(self, index: int, limited: RateLimited | None = None) -> None:
        self.limited = limited or RateLimited(log)
        self.index = index
        self.name = "RX" if index % 2 == 0 else "TX"
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.log: DirtyLog | None = None      # set by the device while LOG_ALL is on
        self.reset()

    def reset(self) -> None:
        """Forget the configuration (not the descriptors: see `close_fds`)."""
        self.num = 0
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.log_used = -1             # guest physical address of the used ring, to log
        self.addr_set = False
        self.last_avail = 0
        self.seen = 0                  # the available index at the last look
        self.used_idx = 0
        self.signalled_used = 0
        self.signalled_valid = False
        self.started = False
        self.enabled = False
        self.broken = False
        self.event_idx = False
        self.indirect = False
        self.errors = 0
        self.unmap()

    def unmap(self) -> None:
        for name in ("_desc", "_dq", "_di", "_dh", "_avail", "_used_h", "_used_i", "_used_q"):
            view = getattr(self, name, None)
            if view is not None:
                view.release()
            setattr(self, name, None)
        self.mapped = False
        self.mem: GuestMemory | None = None

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    # ------------------------------------------------------------ configuration

    def set_num(self, num: int) -> None:
        if not 0 < num <= QUEUE_SIZE_MAX or num & (num - 1):
            raise RingError(f"queue size {num} (a power of two up to {QUEUE_SIZE_MAX})")
        self.num = num

    def set_addr(self, desc: int, used: int, avail: int, log_used: int = -1) -> None:
        """Ring addresses (front-end's user addresses); `log_used`: the used ring's guest
        physical address when the front-end wants its writes logged, else -1."""
        self.desc_addr, self.used_addr, self.avail_addr = desc, used, avail
        self.log_used = log_used
        self.addr_set = True

    @property
    def ready(self) -> bool:
        """Started, mapped and not broken: the ring may be processed."""
        return self.started and self.mapped and not self.broken

    def map(self, mem: GuestMemory, event_idx: bool, indirect: bool) -> None:
        """Point the ring views at guest memory (at start, and after a new memory table)."""
        self.unmap()
        self.event_idx = event_idx
        self.indirect = indirect
        num = self.num
        if not num or not self.addr_set:
            raise RingError("started before its size and addresses were set")
        if self.desc_addr % 16 or self.avail_addr % 2 or self.used_addr % 4:
            raise RingError("misaligned ring addresses")
        extra = 2 if event_idx else 0
        try:
            dview, doff = mem.uva(self.desc_addr, 16 * num)
            aview, aoff = mem.uva(self.avail_addr, 4 + 2 * num + extra)
            uview, uoff = mem.uva(self.used_addr, 4 + 8 * num + extra)
        except BadAddress as exc:
            raise RingError(str(exc)) from None
        desc = dview[doff:doff + 16 * num]
        self._dq = desc.cast("Q")
        self._di = desc.cast("I")
        self._dh = desc.cast("H")
        self._desc = desc
        self._avail = aview[aoff:aoff + 4 + 2 * num + extra].cast("H")
        self._used_h = uview[uoff:uoff + 4 + 8 * num + extra].cast("H")
        self._used_i = uview[uoff:uoff + 4 + 8 * num].cast("I")
        # the used entries as u64, id | len << 32 (x86: little-endian), one store each
        self._used_q = uview[uoff + 4:uoff + 4 + 8 * num].cast("Q")
        self.mem = mem
        self.mapped = True
        # the front-end's base (SET_VRING_BASE) says where to take buffers from; the
        # used index is where the ring says we left off giving them back
        self.used_idx = self.signalled_used = self._used_h[1]
        self.signalled_valid = False

    # ------------------------------------------------------------ available ring

    def avail(self) -> int:
        """How many buffers the driver offers beyond the ones we took."""
        idx = self.seen = self._avail[1]
        n = (idx - self.last_avail) & 0xFFFF
        if n > self.num:
            raise RingError(f"available index moved by {n}, more than the queue size "
                            f"{self.num}")
        return n

    def pop(self) -> int:
        """The next head index (the caller checked `avail()`)."""
        head = self._avail[2 + (self.last_avail & (self.num - 1))]
        if head >= self.num:
            raise RingError(f"head index {head} beyond the queue size {self.num}")
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return head

    def unpop(self, count: int) -> None:
        """Put back the last `count` heads taken (they are read again next time)."""
        self.last_avail = (self.last_avail - count) & 0xFFFF

    def chain(self, head: int, pieces: list[Piece], writable: bool) -> int:
        """Append the buffer of `head` to `pieces` as (view, offset, length); return its size.

        `writable`: the direction every descriptor must have (RX: device-writable).
        """
        dh = self._dh
        flags = dh[8 * head + 6]
        want = DESC_F_WRITE if writable else 0
        if not flags & (DESC_F_NEXT | DESC_F_INDIRECT) and flags & DESC_F_WRITE == want:
            # the common case: one descriptor, in one region
            addr = self._dq[2 * head]
            length = self._di[4 * head + 2]
            if length:
                try:
                    view, off, n = self.mem.gpa(addr, length)
                except BadAddress as exc:
                    raise RingError(str(exc)) from None
                if n == length:
                    pieces.append((view, off, n))
                    return n
            else:
                return 0
        return self._chain_slow(head, pieces, want)

    def gather(self, head: int, buf: bytearray, tail: list[memoryview] | None = None,
               copy: int = 0) -> int:
        """Copy the device-readable buffer of `head` into `buf`; its length.

        The fast path for what drivers send: a chain of descriptors or one
        indirect table of them, each descriptor inside one region.  -1 when
        the buffer is anything else, longer than `buf` or broken: the caller
        then walks it with `chain()`, which says what is wrong.

        With `tail`, only the descriptors that start within the first `copy`
        bytes are copied; the others are appended to `tail` as views of guest
        memory, checked like the rest, for the caller to read in place (Linux
        sends a segment's headers in the first descriptors and its payload in
        page fragments after them).
        """
        dh = self._dh
        flags = dh[8 * head + 6]
        spans = self.mem.spans
        cap = len(buf)
        pos = 0
        if flags & DESC_F_INDIRECT:
            if flags & DESC_F_NEXT or not self.indirect:
                return -1
            addr = self._dq[2 * head]
            length = self._di[4 * head + 2]
            count = length >> 4
            if not length or length & 15 or count > self.num:
                return -1
            for start, end, view in spans:  # noqa: B007 - used after the break
                if start <= addr and addr + length <= end:
                    break
            else:
                return -1
            base = addr - start
            unpack = _DESC.unpack_from
            i = 0
            for _ in range(count):
                addr, length, flags, nxt = unpack(view, base + 16 * i)
                if flags & (DESC_F_WRITE | DESC_F_INDIRECT) or pos + length > cap:
                    return -1
                for start, end, dview in spans:  # noqa: B007 - used after the break
                    if start <= addr and addr + length <= end:
                        break
                else:
                    return -1
                off = addr - start
                if tail is None or pos < copy:
                    buf[pos:pos + length] = dview[off:off + length]
                else:
                    tail.append(dview[off:off + length])
                pos += length
                if not flags & DESC_F_NEXT:
                    return pos
                if nxt >= count:
                    return -1
                i = nxt
            return -1
        dq, di = self._dq, self._di
        num = self.num
        i = head
        for _ in range(num):
            flags = dh[8 * i + 6]
            addr = dq[2 * i]
            length = di[4 * i + 2]
            if flags & (DESC_F_WRITE | DESC_F_INDIRECT) or pos + length > cap:
                return -1
            for start, end, dview in spans:  # noqa: B007 - used after the break
                if start <= addr and addr + length <= end:
                    break
            else:
                return -1
            off = addr - start
            if tail is None or pos < copy:
                buf[pos:pos + length] = dview[off:off + length]
            else:
                tail.append(dview[off:off + length])
            pos += length
            if not flags & DESC_F_NEXT:
                return pos
            i = dh[8 * i + 7]
            if i >= num:
                return -1
        return -1

    def _chain_slow(self, head: int, pieces: list[Piece], want: int) -> int:
        dq, di, dh = self._dq, self._di, self._dh
        num = self.num
        total = 0
        i = head
        seen = 0
        while True:
            seen += 1
            if seen > num:
                raise RingError(f"descriptor chain from {head} is longer than the queue "
                                f"(a loop?)")
            flags = dh[8 * i + 6]
            addr = dq[2 * i]
            length = di[4 * i + 2]
            if flags & DESC_F_INDIRECT:
                if not self.indirect:
                    raise RingError("indirect descriptor without the feature")
                if flags & DESC_F_NEXT or seen > 1:
                    raise RingError("indirect descriptor inside a chain")
                return self._indirect(addr, length, pieces, want)
            if flags & DESC_F_WRITE != want:
                raise RingError(f"descriptor {i}: wrong direction for the {self.name} queue")
            total += self._add(addr, length, pieces)
            if not flags & DESC_F_NEXT:
                return total
            i = dh[8 * i + 7]
            if i >= num:
                raise RingError(f"next index {i} beyond the queue size {num}")

    def _indirect(self, addr: int, length: int, pieces: list[Piece], want: int) -> int:
        if not length or length % 16:
            raise RingError(f"indirect table of {length} bytes")
        count = length // 16
        if count > self.num:
            raise RingError(f"indirect table of {count} descriptors, more than the queue")
        try:
            view, off = self.mem.gpa_whole(addr, length)
        except BadAddress as exc:
            raise RingError(str(exc)) from None
        unpack = _DESC.unpack_from
        total = 0
        i = 0
        seen = 0
        while True:
            seen += 1
            if seen > count:
                raise RingError("indirect chain longer than its table (a loop?)")
            d_addr, d_len, flags, nxt = unpack(view, off + 16 * i)
            if flags & DESC_F_INDIRECT:
                raise RingError("nested indirect table")
            if flags & DESC_F_WRITE != want:
                raise RingError(f"indirect descriptor {i}: wrong direction for the "
                                f"{self.name} queue")
            total += self._add(d_addr, d_len, pieces)
            if not flags & DESC_F_NEXT:
                return total
            if nxt >= count:
                raise RingError(f"indirect next index {nxt} beyond its table of {count}")
            i = nxt

    def _add(self, addr: int, length: int, pieces: list[Piece]) -> int:
        """One descriptor's bytes, split where they cross from one region into the next."""
        left = length
        try:
            while left:
                view, off, n = self.mem.gpa(addr, left)
                pieces.append((view, off, n))
                addr += n
                left -= n
        except BadAddress as exc:
            raise RingError(str(exc)) from None
        return length

    def fill(self, data: memoryview, mergeable: bool) -> int:
        """Copy `data` (header and frame) into the next receive buffers; how many it took.

        The fast path for what drivers offer: single device-writable
        descriptors, each inside one region.  0: not enough buffers (nothing
        is taken); -1: a buffer of another shape (chained, indirect, across
        regions, shorter than the header) is next, and the caller uses
        `chain()` instead (nothing is taken either).  With `mergeable`, the
        count goes into the header's num_buffers field in the first buffer.

        Linux carves its receive buffers one after the other out of larger
        pages and offers them in that order, so a buffer often starts where
        the previous one ended: such runs are copied at once.  A 64 KiB frame
        takes 16 or more buffers, so the loop below is kept to what each one
        needs: one unpack of its descriptor (a head beyond the table makes
        the unpack itself fail), one store of its used entry; a region is
        looked up and bytes copied only where a run breaks.
        """
        avail = self._avail
        num = self.num
        mask = num - 1
        idx = self.seen = avail[1]
        last = self.last_avail
        navail = (idx - last) & 0xFFFF
        if navail > num:
            raise RingError(f"available index moved by {navail}, more than the queue size "
                            f"{num}")
        if not navail:
            return 0
        limit = navail if mergeable else 1
        first = last & mask
        if first + limit <= num:
            heads = avail[2 + first:2 + first + limit]
        else:
            heads = itertools.chain(avail[2 + first:2 + num], avail[2:2 + first + limit - num])
        unpack = _DESC.unpack_from
        table, uq = self._desc, self._used_q
        spans = self.mem.spans
        slot = start_slot = self.used_idx & mask
        need = left = len(data)
        head = 0
        run_view = first_view = None
        run_off = run_src = first_off = 0
        run_next = run_limit = -1       # the guest address that would continue the run
        try:
            for head in heads:
                addr, length, flags, _nxt = unpack(table, head << 4)
                if flags != DESC_F_WRITE:
                    return -1
                if addr != run_next or addr + length > run_limit:
                    # not the next piece of the run: find this buffer's region
                    for start, end, view in spans:  # noqa: B007 - used after the break
                        if start <= addr and addr + length <= end:
                            break
                    else:
                        return -1
                    pos = need - left
                    if run_view is None:
                        if length < 12:
                            return -1
                        first_view, first_off = view, addr - start
                    else:
                        run_view[run_off:run_off + pos - run_src] = data[run_src:pos]
                    run_view, run_off, run_src, run_limit = view, addr - start, pos, end
                if length >= left:
                    uq[slot] = head | left << 32
                    slot = (slot + 1) & mask
                    break
                uq[slot] = head | length << 32
                slot = (slot + 1) & mask
                run_next = addr + length
                left -= length
            else:
                return 0 if limit == navail else -1
        except struct.error:
            raise RingError(f"head index {head} beyond the queue size {num}") from None
        run_view[run_off:run_off + need - run_src] = data[run_src:need]
        k = (slot - start_slot) & mask or num     # all `num` of them: the slot came round
        if mergeable and k > 1:
            _U16.pack_into(first_view, first_off + 10, k)
        used = self.used_idx
        self.last_avail = (last + k) & 0xFFFF
        self.used_idx = (used + k) & 0xFFFF
        if self.log is not None:
            self._log_filled(used, k)
        return k

    # ------------------------------------------------------------ used ring

    def push(self, head: int, length: int) -> None:
        """Give a buffer back (visible to the driver at the next `publish`)."""
        slot = self.used_idx & (self.num - 1)
        ui = self._used_i
        ui[1 + 2 * slot] = head
        ui[2 + 2 * slot] = length
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        if self.log is not None and length:
            self._log_chain(head, length)

    def publish(self) -> None:
        self._used_h[1] = self.used_idx
        if self.log is not None:
            self._log_used_ring()

    # ------------------------------------------------------------ dirty logging

    def _log_filled(self, used: int, count: int) -> None:
        """`fill` took single-descriptor buffers: each used entry names one guest range."""
        mask = self.num - 1
        ui, dq, mark = self._used_i, self._dq, self.log.mark
        for k in range(count):
            slot = (used + k) & mask
            mark(dq[2 * ui[1 + 2 * slot]], ui[2 + 2 * slot])

    def _log_chain(self, head: int, length: int) -> None:
        """The first `length` bytes of `head`'s buffer were written: log their pages."""
        pieces: list[Piece] = []
        try:
            self.chain(head, pieces, True)
        except RingError:
            return            # the guest rewrote the chain since: its own pages, its loss
        bases = {id(view): start for start, _end, view in self.mem.spans}
        mark = self.log.mark
        for view, off, n in pieces:
            if length <= 0:
                break
            mark(bases[id(view)] + off, min(n, length))
            length -= n

    def _log_used_ring(self) -> None:
        if self.log_used >= 0:
            self.log.mark(self.log_used, 4 + 8 * self.num + (2 if self.event_idx else 0))
        self.log.written()

    def notify(self) -> bool:
        """Signal the call eventfd if the driver wants to hear about what we published."""
        if self.call_fd is None or not self.mapped:
            return False
        new = self.used_idx
        old = self.signalled_used
        if new == old:
            return False                   # nothing given back since the last signal
        fence()
        if self.event_idx:
            valid = self.signalled_valid
            self.signalled_used = new
            self.signalled_valid = True
            if valid and not need_event(self._avail[2 + self.num], new, old):
                return False
        else:
            self.signalled_used = new
            self.signalled_valid = True
            if self._avail[0] & AVAIL_F_NO_INTERRUPT:
                return False
        try:
            os.eventfd_write(self.call_fd, 1)
        except OSError as exc:
            log.debug("%s queue: call eventfd: %s", self.name, exc)
        return True

    # ------------------------------------------------------------ kicks

    def want_kicks(self, at: int) -> bool:
        """Ask the driver to kick once its available index passes `at`.

        `at` is `last_avail` to hear of anything we have not taken yet, or the
        current available index to hear only of buffers added from now on.
        Returns True when the index already moved past `at` (no kick will come
        for that: look at the ring again).
        """
        if self.event_idx:
            self._used_h[2 + 4 * self.num] = at
        else:
            self._used_h[0] = 0
        if self.log is not None:
            self._log_used_ring()
        fence()
        return self._avail[1] != at

    def no_kicks(self) -> None:
        """We will look at the ring anyway: the driver need not kick (advisory)."""
        if not self.event_idx:
            self._used_h[0] = USED_F_NO_NOTIFY
            if self.log is not None:
                self._log_used_ring()
        # with EVENT_IDX an old avail_event already lies behind the driver's index

    def fail(self, exc: Exception) -> None:
        """Stop the queue for good (until reconfigured): one log line, the error eventfd."""
        self.broken = True
        self.errors += 1
        self.limited.log(self.name + " stopped", logging.ERROR, "vhost-user %s queue stopped: %s",
                     self.name, exc)
        if self.err_fd is not None:
            try:
                os.eventfd_write(self.err_fd, 1)
            except OSError:
                pass
