"""One passt run: the guest socket, one guest at a time, and what lives across guests.

`setup()` (still as the user who started us) opens the capture file, binds
the UNIX socket (or adopts the `-F` descriptor) and the forwarded ports.
`start()` begins serving: each accepted connection becomes a `StreamTap`
with a fresh `DataPlane` (flows, observed guest MAC and addresses start
over, as for a rebooted guest).  While a guest is connected, further
connections are accepted and closed at once, so a probing qrap moves on
to the next socket.  When the guest goes away we wait for the next one, or
stop with `--one-off` and with `-F` (there is nothing to accept then).
`close()` undoes what exists and is safe after a partial `setup()`.

Privileges: the socket is created before we give up root, then handed to
the user we run as (`--runas`, by default nobody), so that user owns it as
with C passt, which switches user first.  A QEMU running as root can always
connect; any other QEMU user needs `--runas` that user (or to start passt
itself, as libvirt does).
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import stat

from common import budget, flowinfo, sandbox, seccomp, syscalls
from common.conf import Config
from common.control import ControlError, ControlServer, open_control
from common.dataplane import DataPlane
from common.gate import Gate, open_gate
from common.guest import GuestState
from common.listeners import ACCEPT_EXHAUSTED, BindError, pause_accepting
from common.loop import IN, Loop
from common.mapping import AddressMap
from common.pcap import Pcap
from common.process import SetupError
from common.ratelimit import RateLimited
from common.tap import StreamTap
from passt.forwarding import PasstForwarding
from passt.sockpath import (
    BACKLOG,
    SocketPathError,
    bind_socket,
    give_socket,
    qemu_hint,
)

log = logging.getLogger("passt")
_limited = RateLimited(log)


def adopt_fd(fd: int) -> socket.socket:
    """The already-connected stream socket given with -F."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise SetupError(f"--fd {fd}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise SetupError(f"--fd {fd}: not a socket")
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise SetupError(f"--fd {fd}: not a stream socket")
    try:
        sock.getpeername()
    except OSError:
        sock.detach()
        raise SetupError(f"--fd {fd}: socket is not connected") from None
    os.set_inheritable(fd, False)
    return sock


class Session:
    def __init__(self, conf: Config, *, socket_path: str | None = None,
                 bound: tuple[object, str] | None = None,
                 fd: int | None = None, one_off: bool = False,
                 owner: tuple[int, int] | None = None, loop: Loop | None = None) -> None:
        """`owner`: the uid/gid we will run as, who must own the socket."""
        self.conf = conf
        self.loop = loop or Loop()
        self.socket_path = socket_path
        self.bound = bound               # (listening socket, path), bound by the caller
        self.fd = fd
        self.one_off = one_off or fd is not None
        self.owner = owner
        self.listener: socket.socket | None = None
        self.path: str | None = None
        self._ino: tuple[int, int] | None = None
        self.pcap: Pcap | None = None
        self.tap: StreamTap | None = None
        self.dataplane: DataPlane | None = None
        self.forwarding: PasstForwarding | None = None
        self.control: ControlServer | None = None
        self.gate: Gate | None = None
        self.guests = 0
        self._adopted: socket.socket | None = None
        self._dir_fd: int | None = None       # the socket's directory, once sandboxed
        self._paused = None           # the timer that watches the listener again
        self.addrmap: AddressMap | None = None

    # ------------------------------------------------------------ set-up (privileged)

    def setup(self) -> None:
        raise_fd_limit()
        budget.shared()      # sized now, from the raised limit: guests come after the sandbox
        if self.fd is not None:
            self._adopted = adopt_fd(self.fd)
        else:
            try:
                raw, self.path = self.bound or bind_socket(self.socket_path)
            except SocketPathError as exc:
                raise SetupError(str(exc)) from None
            self.bound = None
            self.listener = socket.socket(fileno=raw.detach())
            # again, from the process that stays (we may have daemonised since): a
            # client reading SO_PEERCRED, a second passt naming the holder, sees us
            self.listener.listen(BACKLOG)
            st = os.lstat(self.path)
            self._ino = (st.st_dev, st.st_ino)
            if self.owner is not None and (st.st_uid, st.st_gid) != self.owner:
                try:
                    give_socket(self.path, self._ino, self.owner)
                except SocketPathError as exc:
                    raise SetupError(str(exc)) from None
                except OSError as exc:
                    log.warning("cannot hand socket %s to uid %d: %s", self.path,
                                self.owner[0], exc.strerror)
        try:
            self.gate = open_gate(self.conf, self.loop)
        except OSError as exc:
            raise SetupError(exc.strerror or str(exc)) from None
        if self.conf.pcap:
            try:
                self.pcap = Pcap(self.conf.pcap)
            except OSError as exc:
                raise SetupError(exc.strerror) from None
        self.addrmap = AddressMap(self.conf)      # host interface indices: now, not per guest
        self.forwarding = PasstForwarding(self.conf, self.loop, lambda: self.dataplane)
        try:
            self.forwarding.start()
        except BindError as exc:
            raise SetupError(str(exc)) from None
        self._open_control()

    def _open_control(self) -> None:
        """-c PATH: the control socket (pesto), with -t/-u and the current guest's flows."""
        fw = self.forwarding
        assert fw is not None

        def flows():
            dp = self.dataplane
            if dp is None:
                return
            if dp.tcp:
                yield from flowinfo.tcp_flows(dp.tcp)
            if dp.udp:
                yield from flowinfo.datagram_flows(dp.udp)
            if dp.icmp:
                yield from flowinfo.datagram_flows(dp.icmp, "icmp")

        families = tuple(v for v, c in ((4, self.conf.ip4), (6, self.conf.ip6))
                         if c is not None) or (4, 6)
        try:
            self.control = open_control(self.loop, self.conf.process.control, mode="passt",
                                        forwarders={"-t": fw.tcp_in, "-u": fw.udp_in},
                                        services=self.conf.services, families=families,
                                        flows=flows, gate=self.gate)
        except ControlError as exc:
            raise SetupError(str(exc)) from None
        if self.control is not None:
            self.control.give_to(self.owner)

    def handle_signals(self) -> None:
        """Stop cleanly on SIGTERM, SIGINT and SIGHUP (main thread only)."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.loop.on_signal(signum, self._on_stop_signal)

    def _on_stop_signal(self, signum: int) -> None:
        log.warning("%s: exiting", signal.Signals(signum).name)
        self.loop.stop(0)

    def instructions(self) -> list[str]:
        if self.path is None:
            return [f"using connected socket from file descriptor {self.fd}"]
        return qemu_hint(self.path)

    def enter_sandbox(self, run_as: tuple[int, int] | None) -> None:
        """The last step of set-up: the user we run as, a user namespace of our own,
        the empty root, the filter."""
        extra = ()
        if self.path is not None and self.listener is not None:
            # the path leads nowhere in the empty root: keep its directory to remove
            # our socket from at exit, as libvirt and scripts expect to find it gone
            self._dir_fd = os.open(os.path.dirname(self.path) or ".",
                                   os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            extra = (syscalls.unlink_in(self._dir_fd),)
        try:
            sandbox.enter(sandbox.plan("passt", self.conf, run_as, extra=extra))
        except (sandbox.SandboxError, seccomp.SeccompError) as exc:
            raise SetupError(f"sandbox: {exc}") from None
        except OSError as exc:
            raise SetupError(f"sandbox: {exc.strerror}") from None

    # ------------------------------------------------------------ serving

    def start(self) -> None:
        if self._adopted is not None:
            sock, self._adopted = self._adopted, None
            self._attach(sock)
        elif self.listener is not None:
            self.loop.add(self.listener.fileno(), IN, self._acceptable)

    def _acceptable(self, _events: int) -> None:
        assert self.listener is not None
        for _ in range(16):
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in ACCEPT_EXHAUSTED:
                    self._paused = pause_accepting(self.loop, self.listener.fileno(),
                                                   self._acceptable, exc, "guest socket")
                return
            if self.tap is not None:
                _limited.log("busy", logging.INFO,
                             "another guest connected while one is served: closing it")
                sock.close()
                continue
            self._attach(sock)

    def _attach(self, sock: socket.socket) -> None:
        self.guests += 1
        log.info("guest connected%s", f" (#{self.guests})" if self.guests > 1 else "")
        self.tap = StreamTap(sock, self.loop, self.pcap)
        self.dataplane = DataPlane(self.conf, self.loop, self.tap, GuestState(self.conf),
                                   self.addrmap, gate=self.gate)
        self.dataplane.on_tap_gone = self._guest_gone
        self.dataplane.start()

    def _guest_gone(self) -> None:
        log.info("guest disconnected")
        self._detach()
        if self.one_off:
            self.loop.stop(0)
        else:
            log.info("waiting for the next guest")

    def _detach(self) -> None:
        if self.dataplane is not None:
            self.dataplane.stop()
            self.dataplane = None
        if self.tap is not None:
            tap = self.tap
            log.debug("guest link: %d frames in, %d out, %d dropped, output queue peak %d "
                      "bytes", tap.frames_in, tap.frames_out, tap.dropped_out, tap.peak_queued)
            tap.close()
            self.tap = None

    def run(self) -> int:
        return self.loop.run()

    def close(self) -> None:
        if self.bound is not None:       # bound for us, never taken over: ours to remove
            raw, path = self.bound
            self.bound = None
            raw.close()
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            except OSError:
                pass
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.forwarding is not None:
            self.forwarding.close()
            self.forwarding = None
        self._detach()
        if self.gate is not None:
            self.gate.close()               # after the flows' last records
            self.gate = None
        if self._adopted is not None:
            self._adopted.close()
            self._adopted = None
        if self.listener is not None:
            if self._paused is not None:
                self._paused.cancel()
            self.loop.remove(self.listener.fileno())
            self.listener.close()
            self.listener = None
            if self.path is not None:
                self._remove_socket_file()
        if self.pcap is not None:
            self.pcap.close()
            self.pcap = None
        self.loop.close()


    def _remove_socket_file(self) -> None:
        """Remove the socket file if it still is ours (in the sandbox: through the
        directory descriptor kept for this)."""
        assert self.path is not None
        name, dir_fd = self.path, None
        if self._dir_fd is not None:
            name, dir_fd = os.path.basename(self.path), self._dir_fd
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self._ino:
                os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass       # not ours to remove (any more), or not allowed: it stays
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None


def raise_fd_limit() -> None:
    """Forwarding many ports and many connections need many descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
