"""One pasta run once the target namespace is known: what it creates and tears down.

`setup()` enters the namespace with a helper thread, creates the tap there,
configures links through netlink, opens the capture file and builds the data
plane; `watch_target()` / `watch_command()` arrange to notice the end of what
we serve; `check()` proves, as the user we will run as, that what must keep
working after readiness does; `enter_sandbox()` switches to that user and
confines us (`common.sandbox`). (`pasta.cli.start_up` runs them in that order,
before the parent is told we are ready.) `run()`
serves until the namespace goes away, the command exits or a signal asks us to
stop; `close()` undoes what exists (closing the tap fd removes the interface),
and is safe after a partial `setup()`.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import time

from common import flowinfo, isolation, phases, sandbox, seccomp
from common.conf import Config, format_mac, parse_mac
from common.control import ControlError, ControlServer, open_control
from common.dataplane import DataPlane
from common.gate import Gate, open_gate
from common.helper import Helper
from common.listeners import BindError
from common.loop import Loop
from common.pcap import Pcap
from common.process import SetupError
from common.tap import TunTap
from pasta import netcfg
from pasta.forwarding import PastaForwarding
from pasta.ns import Target
from pasta.nsthread import NsThread
from pasta.tapdev import TapError, open_tap
from pasta.watch import NetnsFileWatch, ProcessWatch, proc_ns_owner

TYPE_CHECKING = False   # typing itself costs 2-5 ms at start-up
if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger("pasta")

COMMAND_EXIT_GRACE = 2.0     # seconds to let a finished command's connections drain


class Session:
    def __init__(self, conf: Config, opts: dict[str, Any], target: Target,
                 helper: Helper) -> None:
        self.conf = conf
        self.opts = opts
        self.target = target
        self.helper = helper
        self.loop = Loop()
        self.ns: NsThread | None = None
        self.tap: TunTap | None = None
        self.pcap: Pcap | None = None
        self.dataplane: DataPlane | None = None
        self.forwarding: PastaForwarding | None = None
        self.control: ControlServer | None = None
        self.gate: Gate | None = None
        self.exit_code = 0
        self._watches: list[object] = []
        self._netns_watch: NetnsFileWatch | None = None

    @property
    def ifname(self) -> str:
        if self.opts.get("ns_ifname"):
            return self.opts["ns_ifname"]
        for fam in (self.conf.ip4, self.conf.ip6):
            if fam is not None and fam.host_ifname:
                return fam.host_ifname
        return "tap0"

    def setup(self) -> None:
        raise_fd_limit()
        try:
            self.gate = open_gate(self.conf, self.loop)
        except OSError as exc:
            raise SetupError(exc.strerror or str(exc)) from None
        self.ns = NsThread(self.target.netns_fd)
        phases.mark("namespace thread")
        if self.conf.splice_only:
            self._setup_splice_only()
        else:
            self._setup_tap()
        try:
            self.forwarding.start()
        except BindError as exc:
            raise SetupError(str(exc)) from None
        phases.mark("forwarding")
        self._open_control()
        self.loop.on_signal(signal.SIGTERM, self._on_stop_signal)
        self.loop.on_signal(signal.SIGINT, self._on_stop_signal)
        self.loop.on_signal(signal.SIGHUP, self._on_stop_signal)

    def _open_control(self) -> None:
        """-c PATH: the control socket (pesto), with every table and the live flows."""
        fw, dp = self.forwarding, self.dataplane
        assert fw is not None
        flows = flowinfo.chain(
            (lambda: flowinfo.tcp_flows(dp.tcp)) if dp and dp.tcp else None,
            (lambda: flowinfo.datagram_flows(dp.udp)) if dp and dp.udp else None,
            (lambda: flowinfo.datagram_flows(dp.icmp, "icmp")) if dp and dp.icmp else None,
            lambda: flowinfo.splice_flows(fw.splicer),
            lambda: flowinfo.udp_splice_flows(fw.udp_splicer))
        families = tuple(v for v, c in ((4, self.conf.ip4), (6, self.conf.ip6))
                         if c is not None) or (4, 6)
        try:
            self.control = open_control(
                self.loop, self.conf.process.control, mode="pasta",
                forwarders={"-t": fw.tcp_in, "-u": fw.udp_in, "-T": fw.tcp_out,
                            "-U": fw.udp_out},
                services=self.conf.services, families=families, flows=flows,
                gate=self.gate)
        except ControlError as exc:
            raise SetupError(str(exc)) from None

    def _setup_splice_only(self) -> None:
        """--splice-only: no tap; lo up in the namespace, loopback forwarding only."""
        netcfg.apply(self.helper, netcfg.NetPlan(ifname=None, mtu=self.conf.mtu),
                     self.target.netns_fd, self.target.userns_fd)
        self.helper.close()
        self.forwarding = PastaForwarding(self.conf, self.loop, self.ns, None, splice=True,
                                          gate=self.gate)

    def _setup_tap(self) -> None:
        try:
            fd, name = self.ns.call(open_tap, self.ifname, True)
        except TapError as exc:
            raise SetupError(str(exc)) from None
        ns_mac = self.opts.get("ns_mac_addr")
        plan = netcfg.plan(self.conf, name,
                           format_mac(parse_mac(ns_mac)) if ns_mac else None,
                           config_net=bool(self.opts.get("config_net")),
                           copy_addrs=not self.opts.get("no_copy_addrs"),
                           copy_routes=not self.opts.get("no_copy_routes"))
        self.tap = TunTap(fd, vnet_hdr=True, loop=self.loop)
        phases.mark("tap")
        if self.conf.pcap:
            try:
                self.pcap = self.tap.pcap = Pcap(self.conf.pcap)
            except OSError as exc:
                raise SetupError(exc.strerror) from None
        done = netcfg.apply(self.helper, plan, self.target.netns_fd, self.target.userns_fd)
        self.helper.close()           # its pyroute2 goes with it
        phases.mark("netlink set-up")
        log.debug("namespace interface %s: %s", name, done)
        self.dataplane = DataPlane(self.conf, self.loop, self.tap,
                                   _guest_state(self.conf, ns_mac), gate=self.gate)
        self.dataplane.start()
        phases.mark("data plane")
        self.forwarding = PastaForwarding(self.conf, self.loop, self.ns, self.dataplane.tcp,
                                          splice=not self.opts.get("no_splice"),
                                          udp=self.dataplane.udp, guest=self.dataplane.guest,
                                          host_lo_to_ns_lo=bool(
                                              self.opts.get("host_lo_to_ns_lo")),
                                          gate=self.gate, flows=self.dataplane.flows)

    def _on_stop_signal(self, signum: int) -> None:
        log.warning("%s: exiting", signal.Signals(signum).name)
        self.loop.stop(0)

    def enter_sandbox(self, run_as: tuple[int, int] | None) -> None:
        """The last step of set-up: the empty root, the user we run as, the filter.

        The namespace thread confines itself too (see common.sandbox)."""
        if self.control is not None:
            self.control.give_to(run_as)
        try:
            checksums = self.tap is None or not self.tap.csum_offload
            sandbox.enter(sandbox.plan("pasta", self.conf, run_as, checksums),
                          self.ns.call if self.ns is not None else None)
        except (sandbox.SandboxError, seccomp.SeccompError) as exc:
            raise SetupError(f"sandbox: {exc}") from None
        except OSError as exc:
            raise SetupError(f"sandbox: {exc.strerror}") from None

    def watch_target(self) -> None:
        owner = proc_ns_owner(self.target.netns_path) if self.target.netns_path else None
        if owner is not None and not self.opts.get("no_netns_quit"):
            self._watches.append(ProcessWatch(self.loop, owner, lambda: self._owner_exited(owner)))
        elif self.target.netns_path and not self.opts.get("no_netns_quit"):
            try:
                self._netns_watch = NetnsFileWatch(self.loop, self.target.netns_path,
                                                   self.target.netns_fd,
                                                   lambda: self.loop.stop(0))
            except OSError as exc:
                raise SetupError(f"cannot watch namespace file {self.target.netns_path}: "
                                 f"{exc.strerror}") from None
            self._watches.append(self._netns_watch)
        elif self.target.pid is not None:
            self._watches.append(ProcessWatch(self.loop, self.target.pid,
                                              lambda: self._target_exited()))

    def check(self, run_as: tuple[int, int] | None) -> None:
        """As the user we will run as: the namespace watch works."""
        if self._netns_watch is not None:
            try:
                isolation.check_as(run_as, self._netns_watch.verify)
            except OSError as exc:
                raise SetupError(exc.strerror) from None

    def _owner_exited(self, pid: int) -> None:
        log.info("process %d exited, namespace file %s is gone, exiting", pid,
                 self.target.netns_path)
        self.loop.stop(0)

    def _target_exited(self) -> None:
        log.info("process %d exited, exiting", self.target.pid)
        self.loop.stop(0)

    def watch_command(self, pid: int) -> None:
        def exited() -> None:
            phases.mark("command exited")
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            self.exit_code = code if code >= 0 else 128 - code
            self._linger(time.monotonic() + COMMAND_EXIT_GRACE)

        self._watches.append(ProcessWatch(self.loop, pid, exited))

    def _linger(self, until: float) -> None:
        """The command is gone, but what it wrote may still be in flight in its
        sockets: keep serving until its connections are closed, briefly."""
        tcp = self.dataplane.tcp if self.dataplane else None
        if not tcp or not tcp.conns or time.monotonic() >= until:
            self.loop.stop(self.exit_code)
            return
        self.loop.call_later(0.02, lambda: self._linger(until))

    def run(self) -> int:
        return self.loop.run()

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.forwarding is not None:
            self.forwarding.close()
            self.forwarding = None
        if self.dataplane is not None:
            self.dataplane.stop()
        if self.gate is not None:
            self.gate.close()               # after the flows' last records
            self.gate = None
        if self.tap is not None:
            self.tap.close()
            self.tap = None
        if self.pcap is not None:
            self.pcap.close()
            self.pcap = None
        if self.ns is not None:
            self.ns.stop()
            self.ns = None
        self.target.close()
        self.loop.close()


def raise_fd_limit() -> None:
    """Forwarding every port and many connections need many descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _guest_state(conf: Config, ns_mac: str | None):
    from common.guest import GuestState

    return GuestState(conf, parse_mac(ns_mac) if ns_mac else None)
