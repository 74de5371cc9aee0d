"""The vhost-user back-end of one virtio-net device: what each front-end message does.

This is the control plane, one instance per front-end connection: the
features and protocol features negotiated, the memory table, and two
virtqueues (0: receive, the guest's RX; 1: transmit, the guest's TX).  It
takes whole messages (see `connection` for the socket side) and returns the
reply bytes, if any; it never reads or writes the socket itself.  The data
plane (`vhost.tap`) reads the rings it sets up.

What we offer: VIRTIO 1.x with split rings, event index, indirect
descriptors, mergeable receive buffers, and checksum and TCP segmentation
offload both ways (CSUM/HOST_TSO4/HOST_TSO6: the guest may send partial
checksums and 64 KiB TCP segments; GUEST_CSUM/GUEST_TSO4/GUEST_TSO6: we may
send them).  Protocol features: REPLY_ACK, RESET_DEVICE, and for live
migration LOG_SHMFD (with the LOG_ALL feature: the pages we write are logged
in a bitmap the front-end shares, see `dirtylog`) and DEVICE_STATE (what we
know of the guest goes from one back-end to the next, see `migration`).  Not
offered, and refused if asked anyway: multiqueue, the back-end request
channel, in-band notifications, IOMMU, packed rings, configuration space.

Ring states follow the specification: a ring starts when it gets a kick
eventfd and stops at GET_VRING_BASE; it is enabled at start when
PROTOCOL_FEATURES was not negotiated, else by SET_VRING_ENABLE.  A message
that fails (bad size, an unmappable region, a ring in no region) fails
alone: with REPLY_ACK the front-end hears a non-zero status, and a ring
that cannot be mapped is stopped with one log line.  Only a message we
cannot parse at all (`ProtocolError`) ends the connection.

Descriptors that arrive with a message are ours: the ones a message keeps
(memory, kick, call, error) are closed when replaced or at `close()`, all
others right after the message.
"""

from __future__ import annotations

import logging
import os
import select
from collections.abc import Callable

from common.ratelimit import RateLimited
from passt.vhost import protocol as P
from passt.vhost.dirtylog import DirtyLog, LogMapError
from passt.vhost.memory import GuestMemory, MemoryMapError
from passt.vhost.protocol import PF, F, Message, Req, bits
from passt.vhost.virtqueue import RingError, Virtqueue

log = logging.getLogger("vhost")

RX, TX = 0, 1
QUEUES = 2

FEATURES = bits(F.NET_CSUM, F.NET_GUEST_CSUM, F.NET_GUEST_TSO4, F.NET_GUEST_TSO6,
                F.NET_HOST_TSO4, F.NET_HOST_TSO6, F.NET_MRG_RXBUF, F.ANY_LAYOUT,
                F.RING_INDIRECT_DESC, F.RING_EVENT_IDX, F.PROTOCOL_FEATURES, F.VERSION_1,
                F.LOG_ALL)
PROTOCOL_FEATURES = bits(PF.REPLY_ACK, PF.RESET_DEVICE, PF.LOG_SHMFD, PF.DEVICE_STATE)
TRANSFER_SAVE, TRANSFER_LOAD = 0, 1      # SET_DEVICE_STATE_FD directions
PHASE_STOPPED = 0                        # the only migration phase defined
STATE_MAX = 1 << 16                      # a device state larger than this is refused
MAX_MEM_SLOTS = 8

# requests that always have a reply of their own
_OWN_REPLY = frozenset((Req.GET_FEATURES, Req.GET_PROTOCOL_FEATURES, Req.GET_VRING_BASE,
                        Req.GET_QUEUE_NUM, Req.GET_CONFIG, Req.GET_MAX_MEM_SLOTS,
                        Req.GET_STATUS, Req.CHECK_DEVICE_STATE, Req.SET_DEVICE_STATE_FD,
                        Req.SET_LOG_BASE))


class Failed(Exception):
    """This message failed (REPLY_ACK says so); the connection carries on."""


class VhostUserDevice:
    def __init__(self, on_change: Callable[[], None] | None = None,
                 save_state: Callable[[], bytes] | None = None,
                 load_state: Callable[[bytes], None] | None = None) -> None:
        """`save_state`/`load_state`: the device state for migration, made and taken by
        the owner (`load_state` raises ValueError for a state it refuses)."""
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.mem = GuestMemory()
        # how often most of what we log happens is the guest driver's choice: said at
        # most about once a second per kind, for the life of this front-end
        self.limited = RateLimited(log)
        self.queues = [Virtqueue(i, self.limited) for i in range(QUEUES)]
        self.epoll = select.epoll()           # kick eventfds of started queues
        self.on_change = on_change or (lambda: None)
        self.save_state = save_state or (lambda: b"")
        self.load_state = load_state or (lambda _data: None)
        self.log: DirtyLog | None = None
        self._log_call: int | None = None     # SET_LOG_FD's eventfd (the log only uses it)
        self._state_in: int | None = None     # the pipe a state to load comes through
        self._state_result = 0                # what CHECK_DEVICE_STATE reports
        self.messages = 0
        self._handlers: dict[int, Callable[[Message], bytes | None]] = {
            Req.GET_FEATURES: self._get_features,
            Req.SET_FEATURES: self._set_features,
            Req.SET_OWNER: self._set_owner,
            Req.RESET_OWNER: self._reset_owner,
            Req.SET_MEM_TABLE: self._set_mem_table,
            Req.SET_VRING_NUM: self._set_vring_num,
            Req.SET_VRING_ADDR: self._set_vring_addr,
            Req.SET_VRING_BASE: self._set_vring_base,
            Req.GET_VRING_BASE: self._get_vring_base,
            Req.SET_VRING_KICK: self._set_vring_kick,
            Req.SET_VRING_CALL: self._set_vring_call,
            Req.SET_VRING_ERR: self._set_vring_err,
            Req.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Req.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Req.SET_VRING_ENABLE: self._set_vring_enable,
            Req.SET_VRING_ENDIAN: self._set_vring_endian,
            Req.GET_CONFIG: self._get_config,
            Req.RESET_DEVICE: self._reset_device,
            Req.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Req.SET_LOG_BASE: self._set_log_base,
            Req.SET_LOG_FD: self._set_log_fd,
            Req.SET_DEVICE_STATE_FD: self._set_device_state_fd,
            Req.CHECK_DEVICE_STATE: self._check_device_state,
        }

    # ------------------------------------------------------------ what the data plane asks

    @property
    def rx(self) -> Virtqueue:
        return self.queues[RX]

    @property
    def tx(self) -> Virtqueue:
        return self.queues[TX]

    def has(self, feature: int) -> bool:
        return bool(self.features >> feature & 1)

    @property
    def running(self) -> bool:
        """Both rings started (the data plane has something to serve)."""
        return self.rx.started and self.tx.started

    @property
    def hdr_len(self) -> int:
        """The virtio-net header in front of every frame: 12 bytes, 10 for legacy drivers."""
        return 12 if self.has(F.VERSION_1) or self.has(F.NET_MRG_RXBUF) else 10

    @property
    def guest_offload(self) -> bool:
        """We may send partial checksums and large TCP segments to the guest."""
        return all(self.has(f) for f in (F.NET_GUEST_CSUM, F.NET_GUEST_TSO4, F.NET_GUEST_TSO6))

    # ------------------------------------------------------------ messages

    def handle(self, msg: Message) -> bytes | None:
        """Act on one message; the reply to send, if any.  Raises ProtocolError (fatal)."""
        self.messages += 1
        handler = self._handlers.get(msg.request)
        log.debug("vhost-user: %s%s", msg.name, f" ({len(msg.fds)} fds)" if msg.fds else "")
        status = 0
        out: bytes | None = None
        try:
            if handler is None:
                raise Failed(f"{msg.name} is not supported")
            out = handler(msg)
        except Failed as exc:
            status = 1
            self.limited.warning("failed", "vhost-user %s failed: %s", msg.name, exc)
            if msg.request == Req.GET_CONFIG:
                out = b""                 # an empty configuration says "failed"
            elif msg.request in _OWN_REPLY:
                out = P.U64.pack(1)
        finally:
            for fd in msg.take_fds():     # whatever the handler did not keep
                os.close(fd)
        self.on_change()
        if out is not None:
            return P.reply(msg.request, out)
        if msg.need_reply:
            return P.reply_u64(msg.request, status)
        return None

    def _get_features(self, _msg: Message) -> bytes:
        return P.U64.pack(FEATURES)

    def _set_features(self, msg: Message) -> None:
        value = msg.u64()
        if value & ~FEATURES:
            raise Failed(f"features {value & ~FEATURES:#x} were not offered")
        if value & (1 << F.VERSION_1) == 0 and value & (1 << F.RING_EVENT_IDX):
            log.debug("vhost-user: legacy driver")
        logging_before = self.has(F.LOG_ALL)
        self.features = value
        self.limited.log("features", logging.INFO, "vhost-user: features %#x (%s)", value,
                     describe_features(value))
        if self.has(F.LOG_ALL) != logging_before:
            log.info("vhost-user: dirty page logging %s", "on" if self.has(F.LOG_ALL) else "off")
        self._attach_log()
        self._remap()

    def _set_owner(self, _msg: Message) -> None:
        self.owner = True

    def _reset_owner(self, _msg: Message) -> None:
        # deprecated; the specification recommends disabling the rings and no more
        for q in self.queues:
            q.enabled = False

    def _set_mem_table(self, msg: Message) -> None:
        table = msg.regions()
        try:
            mem = GuestMemory.map(table, msg.take_fds())
        except MemoryMapError as exc:
            raise Failed(str(exc)) from None
        old, self.mem = self.mem, mem
        for r in mem.regions:
            log.debug("vhost-user: %r", r)
        self._remap()
        old.close()

    def _queue(self, index: int) -> Virtqueue:
        if not 0 <= index < QUEUES:
            raise Failed(f"queue {index} does not exist (we have {QUEUES})")
        return self.queues[index]

    def _set_vring_num(self, msg: Message) -> None:
        index, num = msg.state()
        q = self._queue(index)
        try:
            q.set_num(num)
        except RingError as exc:
            raise Failed(str(exc)) from None
        if q.started:
            self._map_queue(q)            # a running ring of another size: views anew

    def _set_vring_addr(self, msg: Message) -> None:
        index, flags, desc, used, avail, log_used = msg.addr()
        q = self._queue(index)
        q.set_addr(desc, used, avail, log_used if flags & P.VRING_F_LOG else -1)
        if q.started:
            self._map_queue(q)

    def _set_vring_base(self, msg: Message) -> None:
        index, num = msg.state()
        q = self._queue(index)
        q.last_avail = num & 0xFFFF

    def _get_vring_base(self, msg: Message) -> bytes:
        index, _ = msg.state()
        q = self._queue(index)
        if q.mapped:
            q.publish()
            q.notify()
        self._stop(q)
        base = q.last_avail
        log.debug("vhost-user: %s queue stopped at %d", q.name, base)
        return P.STATE.pack(index, base)

    def _stop(self, q: Virtqueue) -> None:
        if q.kick_fd is not None:
            self._unwatch(q.kick_fd)
            os.close(q.kick_fd)
            q.kick_fd = None
        q.started = False
        q.enabled = False
        q.broken = False
        q.unmap()

    def _vring_fd(self, msg: Message) -> tuple[Virtqueue, int | None]:
        value = msg.u64()
        q = self._queue(value & P.VRING_IDX_MASK)
        if value & P.VRING_NOFD_MASK:
            return q, None
        return q, _one_fd(msg)

    def _set_vring_kick(self, msg: Message) -> None:
        q, fd = self._vring_fd(msg)
        if q.kick_fd is not None:
            self._unwatch(q.kick_fd)
            os.close(q.kick_fd)
            q.kick_fd = None
        if fd is None:
            q.started = False
            raise Failed(f"{q.name} queue: polling instead of kicks is not supported")
        os.set_blocking(fd, False)
        q.kick_fd = fd
        try:
            # edge-triggered: a kick is news, its count is not (we never read it)
            self.epoll.register(fd, select.EPOLLIN | select.EPOLLET)
        except OSError as exc:
            q.kick_fd = None
            os.close(fd)
            raise Failed(f"{q.name} queue: kick descriptor: {exc.strerror}") from None
        q.started = True
        q.broken = False
        if not self.has(F.PROTOCOL_FEATURES):
            q.enabled = True
        self._map_queue(q)
        self._look_at_ring(q)

    def _set_vring_call(self, msg: Message) -> None:
        q, fd = self._vring_fd(msg)
        if q.call_fd is not None:
            os.close(q.call_fd)
        q.call_fd = fd
        q.signalled_valid = False            # a new eventfd: the next used buffer signals

    def _set_vring_err(self, msg: Message) -> None:
        q, fd = self._vring_fd(msg)
        if q.err_fd is not None:
            os.close(q.err_fd)
        q.err_fd = fd

    def _get_protocol_features(self, _msg: Message) -> bytes:
        return P.U64.pack(PROTOCOL_FEATURES)

    def _set_protocol_features(self, msg: Message) -> None:
        value = msg.u64()
        if value & ~PROTOCOL_FEATURES:
            raise Failed(f"protocol features {value & ~PROTOCOL_FEATURES:#x} were not offered")
        self.protocol_features = value

    def _set_vring_enable(self, msg: Message) -> None:
        index, num = msg.state()
        q = self._queue(index)
        q.enabled = bool(num)
        log.debug("vhost-user: %s queue %s", q.name, "enabled" if num else "disabled")
        self._look_at_ring(q)

    def _set_vring_endian(self, msg: Message) -> None:
        index, num = msg.state()
        self._queue(index)
        if num != 0:
            raise Failed("big-endian rings are not supported")

    def _get_config(self, _msg: Message) -> bytes:
        raise Failed("no configuration space (CONFIG was not offered)")

    def _reset_device(self, _msg: Message) -> None:
        self.limited.log("reset", logging.INFO, "vhost-user: device reset")
        self.reset()

    def _get_max_mem_slots(self, _msg: Message) -> bytes:
        return P.U64.pack(MAX_MEM_SLOTS)

    # ------------------------------------------------------------ migration

    def _set_log_base(self, msg: Message) -> bytes:
        size, offset = msg.log()
        fd = _one_fd(msg)
        try:
            new = DirtyLog(fd, size, offset)
        except LogMapError as exc:
            raise Failed(str(exc)) from None
        finally:
            os.close(fd)                  # the mapping keeps what it needs
        if self.log is not None:
            self.log.close()
        new.call_fd = self._log_call
        self.log = new
        log.debug("vhost-user: dirty log of %d bytes", size)
        self._attach_log()
        return P.U64.pack(0)              # with LOG_SHMFD the front-end waits for a reply

    def _set_log_fd(self, msg: Message) -> None:
        fd = _one_fd(msg)
        if self._log_call is not None:
            os.close(self._log_call)
        self._log_call = fd
        if self.log is not None:
            self.log.call_fd = fd

    def _attach_log(self) -> None:
        current = self.log if self.has(F.LOG_ALL) else None
        for q in self.queues:
            q.log = current

    def _set_device_state_fd(self, msg: Message) -> bytes:
        direction, phase = msg.transfer()
        fd = _one_fd(msg)
        if phase != PHASE_STOPPED or direction not in (TRANSFER_SAVE, TRANSFER_LOAD):
            os.close(fd)
            raise Failed(f"transfer direction {direction}, phase {phase}")
        self._close_state_in()
        if direction == TRANSFER_SAVE:
            self._state_result = self._write_state(fd)
        else:
            self._state_in = fd           # read at CHECK_DEVICE_STATE: the front-end
            self._state_result = 0        # writes it all and closes its end before that
        return P.U64.pack(P.VRING_NOFD_MASK)    # we use its pipe, we pass no other

    def _write_state(self, fd: int) -> int:
        try:
            data = memoryview(self.save_state())
            os.set_blocking(fd, False)
            while data:
                data = data[os.write(fd, data):]
            log.info("vhost-user: device state saved for migration")
            return 0
        except OSError as exc:
            log.error("vhost-user: cannot write the device state: %s", exc.strerror or exc)
            return 1
        finally:
            os.close(fd)

    def _check_device_state(self, _msg: Message) -> bytes:
        if self._state_in is not None:
            self._state_result = self._read_state(self._state_in)
            self._close_state_in()
        return P.U64.pack(self._state_result)

    def _read_state(self, fd: int) -> int:
        chunks = []
        total = 0
        try:
            os.set_blocking(fd, False)
            while chunk := os.read(fd, 4096):
                total += len(chunk)
                if total > STATE_MAX:
                    raise ValueError(f"more than {STATE_MAX} bytes")
                chunks.append(chunk)
            self.load_state(b"".join(chunks))
        except BlockingIOError:
            log.error("vhost-user: the device state was not all there when checked")
            return 1
        except (OSError, ValueError) as exc:
            log.error("vhost-user: device state refused: %s", exc)
            return 1
        log.info("vhost-user: device state loaded (%d bytes)", total)
        return 0

    def _close_state_in(self) -> None:
        if self._state_in is not None:
            os.close(self._state_in)
            self._state_in = None

    # ------------------------------------------------------------ rings

    def _map_queue(self, q: Virtqueue) -> None:
        if not q.started:
            return
        try:
            q.map(self.mem, self.has(F.RING_EVENT_IDX), self.has(F.RING_INDIRECT_DESC))
        except RingError as exc:
            q.fail(exc)
            return
        if log.isEnabledFor(logging.DEBUG):
            gpa = self.mem.guest_address
            log.debug("vhost-user: %s ring in guest memory: descriptors %#x, available %#x, "
                      "used %#x, %d entries", q.name, gpa(q.desc_addr), gpa(q.avail_addr),
                      gpa(q.used_addr), q.num)

    def _remap(self) -> None:
        for q in self.queues:
            self._map_queue(q)

    def _look_at_ring(self, q: Virtqueue) -> None:
        """A ring just started serving: what the driver offered meanwhile, it offered
        without a kick we would see (its last kick went to the previous ring, or it was
        told not to), so kick ourselves once."""
        if q.enabled and q.ready and q.kick_fd is not None:
            os.eventfd_write(q.kick_fd, 1)

    def _unwatch(self, fd: int) -> None:
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass

    def reset(self) -> None:
        """Back to the state of a new connection (ownership kept)."""
        for q in self.queues:
            self._stop(q)
            q.close_fds()
            q.reset()
        self.features = 0
        self.protocol_features = 0
        self.mem.close()
        self.mem = GuestMemory()
        self._attach_log()
        if self.log is not None:
            self.log.close()
            self.log = None
        if self._log_call is not None:
            os.close(self._log_call)
            self._log_call = None
        self._close_state_in()

    def close(self) -> None:
        self.reset()
        self.epoll.close()


def _one_fd(msg: Message) -> int:
    """The one descriptor `msg` must carry, now ours; Failed (all closed) otherwise."""
    fds = msg.take_fds()
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise Failed(f"{len(fds)} descriptors, expected one")
    return fds[0]


_NAMES = {F.NET_CSUM: "csum", F.NET_GUEST_CSUM: "guest_csum", F.NET_GUEST_TSO4: "guest_tso4",
          F.NET_GUEST_TSO6: "guest_tso6", F.NET_HOST_TSO4: "host_tso4",
          F.NET_HOST_TSO6: "host_tso6", F.NET_MRG_RXBUF: "mrg_rxbuf",
          F.RING_INDIRECT_DESC: "indirect_desc", F.RING_EVENT_IDX: "event_idx",
          F.PROTOCOL_FEATURES: "protocol_features", F.VERSION_1: "version_1",
          F.ANY_LAYOUT: "any_layout", F.LOG_ALL: "log_all"}


def describe_features(value: int) -> str:
    return " ".join(name for bit, name in sorted(_NAMES.items()) if value >> bit & 1)
