"""The control socket (common.control) and pesto's command line (pesto.cli), unit level.

The server runs on a real loop with real TCP listeners, in a thread with a
network namespace of its own (tests.support.in_fresh_netns), so that a port
taken by another socket really fails to bind.  Clients speak the protocol
over the real UNIX socket.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time

import pytest

from common.control import CLIENTS_MAX, REQUEST_MAX, ControlError, ControlServer
from common.flowinfo import FlowRecord
from common.fwd import parse_forward
from common.gate import Gate
from common.listeners import PortForwarder, host_socket, tcp_listener
from common.loop import Loop
from common.options import getopt
from common.policy import TCP, PolicyConfig, parse_policy_text
from pesto.cli import OPTIONS, build_ops, format_flows, format_policy, format_tables, policy_op
from tests.support import in_fresh_netns, spin


def accept_and_close(sock, *_args):
    sock.close()


class Rig:
    """A ControlServer over -t/-u forwarders on 127.0.0.1, in the calling thread's netns."""

    def __init__(self, path: str, *, tcp: str = "none", timeout: float = 5.0) -> None:
        self.loop = Loop()
        spec = parse_forward([tcp], mode="passt", proto="tcp", families=(4,))
        self.tcp = PortForwarder(self.loop, spec, "-t", families=(socket.AF_INET,),
                                 loopback_only=False,
                                 open_port=tcp_listener(self.loop, host_socket, accept_and_close))
        self.udp = PortForwarder(self.loop, parse_forward([], mode="passt", proto="udp"), "-u",
                                 families=(socket.AF_INET,), loopback_only=False,
                                 open_port=tcp_listener(self.loop, host_socket, accept_and_close))
        self.tcp.start()
        flows = [FlowRecord("tcp", "tap", "10.0.0.2:80", "192.0.2.9:4000", True, 10, 20, 1.5)]
        self.gate = Gate(PolicyConfig(rules=tuple(parse_policy_text(
            "deny tcp:192.0.2.0/24:443", "start", None)[0]), default="deny"))
        self.server = ControlServer(self.loop, path, mode="passt",
                                    forwarders={"-t": self.tcp, "-u": self.udp},
                                    families=(4,), flows=lambda: iter(flows), timeout=timeout,
                                    gate=self.gate)
        self.server.open()

    def client(self) -> socket.socket:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(self.server.path)
        c.setblocking(False)
        return c

    def talk(self, c: socket.socket, data: bytes | None, spins: int = 40) -> list[dict]:
        """Send `data` as the server takes it, run the loop until the server closes,
        return what it sent (one loop, one thread: the client never blocks)."""
        data = data or b""
        got = b""
        for _ in range(spins):
            while data:
                try:
                    data = data[c.send(data):]
                except BlockingIOError:
                    break
                except (BrokenPipeError, ConnectionResetError):
                    data = b""             # the server gave up on us: read its answer
            spin(self.loop, 0.01)
            try:
                chunk = c.recv(1 << 20)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
        c.close()
        return [json.loads(line) for line in got.splitlines()]

    def request(self, ops: list[dict], version: int = 1) -> dict:
        lines = self.talk(self.client(), json.dumps({"version": version, "ops": ops}).encode()
                          + b"\n")
        assert lines[0]["protocol"] == "passt-py-control" and lines[0]["version"] == 1
        assert len(lines) == 2, lines
        return lines[1]

    def close(self) -> None:
        self.server.close()
        self.tcp.close()
        self.udp.close()
        self.loop.close()


def run(tmp_path, body, **kw):
    def inner():
        rig = Rig(str(tmp_path / "ctl"), **kw)
        try:
            return body(rig)
        finally:
            rig.close()
    return in_fresh_netns(inner)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_show_add_delete_clear(tmp_path):
    def body(rig):
        r = rig.request([{"op": "show"}])
        assert r == {"ok": True, "tables": {"HOST": {"tcp": ["[0.0.0.0]:7001 => 7001"],
                                                     "udp": []}}}
        r = rig.request([{"op": "add", "option": "-t", "spec": "7002:80"},
                         {"op": "add", "option": "-u", "spec": "7003"}])
        assert r["ok"] and r["tables"]["HOST"]["tcp"] == ["[0.0.0.0]:7001 => 7001",
                                                          "[0.0.0.0]:7002 => 80"]
        assert listening(7002)
        r = rig.request([{"op": "delete", "option": "-t", "spec": "7001"}])
        assert r["ok"] and not listening(7001) and listening(7002)
        r = rig.request([{"op": "clear", "table": "HOST"}])
        assert r == {"ok": True, "tables": {"HOST": {"tcp": [], "udp": []}}}
        assert not listening(7002)
        assert rig.server.requests == 4
    run(tmp_path, body, tcp="7001")


def test_all_or_nothing(tmp_path):
    def body(rig):
        blocker = socket.socket()
        blocker.bind(("0.0.0.0", 7012))
        blocker.listen()
        r = rig.request([{"op": "add", "option": "-t", "spec": "7011"},
                         {"op": "delete", "option": "-t", "spec": "7001"},
                         {"op": "add", "option": "-t", "spec": "7012"}])
        assert r == {"ok": False,
                     "error": "cannot bind -t port 7012 on 0.0.0.0: Address already in use"}
        assert not listening(7011)                 # what this request opened is closed
        assert listening(7001)                     # what it would have deleted stays
        assert rig.request([])["tables"]["HOST"]["tcp"] == ["[0.0.0.0]:7001 => 7001"]
        blocker.close()
    run(tmp_path, body, tcp="7001")


@pytest.mark.parametrize("data, error", [
    (b"hello\n", "malformed request: not JSON"),
    (b"\xff\xfe\n", "malformed request: not JSON"),
    (b"[1, 2]\n", "malformed request: not an object"),
    (b'{"ops": []}\n', "unsupported protocol version None (this is version 1)"),
    (b'{"version": 2, "ops": []}\n', "unsupported protocol version 2 (this is version 1)"),
    (b'{"version": 1, "ops": "show"}\n',
     "malformed request: 'ops' must be a list of at most 256"),
    (b'{"version": 1, "ops": [{"op": "reboot"}]}\n', "unknown op 'reboot'"),
    (b'{"version": 1, "ops": [7]}\n', "malformed request: each op is an object with 'op'"),
    (b'{"version": 1, "ops": [{"op": "add", "option": "-T", "spec": "22"}]}\n',
     "add: no table for option '-T' here"),
    (b'{"version": 1, "ops": [{"op": "add", "option": "-t", "spec": 22}]}\n',
     "add: 'spec' must be a string"),
    (b'{"version": 1, "ops": [{"op": "add", "option": "-t", "spec": "0"}]}\n',
     "-t 0: port 0 is not allowed"),
    (b'{"version": 1, "ops": [{"op": "add", "option": "-t", "spec": "auto"}]}\n',
     "-t auto: 'auto' port forwarding is only for pasta"),
    (b'{"version": 1, "ops": [{"op": "add", "option": "-t", "spec": "7001"}]}\n',
     "-t 7001: [0.0.0.0]:7001 => 7001 conflicts with [0.0.0.0]:7001 => 7001"),
    (b'{"version": 1, "ops": [{"op": "delete", "option": "-t", "spec": "7009"}]}\n',
     "-t 7009: no rule [0.0.0.0]:7009 => 7009 to delete"),
    (b'{"version": 1, "ops": [{"op": "clear", "table": "SPLICE"}]}\n',
     "clear: no table 'SPLICE' here"),
    (b"x" * (REQUEST_MAX + 10), f"request longer than {REQUEST_MAX} bytes"),
])
def test_bad_requests_get_one_error_and_change_nothing(tmp_path, data, error):
    def body(rig):
        lines = rig.talk(rig.client(), data)
        assert lines[1:] == [{"ok": False, "error": error}]
        assert listening(7001)
        assert rig.request([])["tables"]["HOST"]["tcp"] == ["[0.0.0.0]:7001 => 7001"]
    run(tmp_path, body, tcp="7001")


def test_stalled_client_is_dropped(tmp_path):
    def body(rig):
        c = rig.client()
        partial = rig.talk(c, b'{"version": 1, ', spins=60)      # never a newline
        assert partial[1:] == [{"ok": False, "error": "timed out waiting for a request"}]
        assert rig.server.clients == {}
        assert rig.request([{"op": "show"}])["ok"]               # still serving
    run(tmp_path, body, timeout=0.2)


def test_concurrent_clients_and_a_limit(tmp_path):
    def body(rig):
        clients = []
        for _ in range(CLIENTS_MAX + 2):     # one at a time: the listen backlog is short
            clients.append(rig.client())
            spin(rig.loop, 0.01)
        assert len(rig.server.clients) == CLIENTS_MAX
        replies = []
        for i, c in enumerate(clients):
            lines = rig.talk(c, json.dumps({"version": 1, "ops": [
                {"op": "add", "option": "-t", "spec": str(7100 + i)}]}).encode() + b"\n")
            replies.append(lines[-1])
        assert all(r["ok"] for r in replies[:CLIENTS_MAX])
        assert replies[CLIENTS_MAX:] == [{"ok": False,
                                          "error": "busy: too many control clients"}] * 2
        assert all(listening(7100 + i) for i in range(CLIENTS_MAX))
    run(tmp_path, body)


def test_flows(tmp_path):
    def body(rig):
        r = rig.request([{"op": "flows"}])
        assert r["flows"] == [{"proto": "tcp", "path": "tap", "guest": "10.0.0.2:80",
                               "host": "192.0.2.9:4000", "inbound": True, "to_guest": 10,
                               "from_guest": 20, "age": 1.5, "id": None, "verdict": None,
                               "rule": None, "frames_to_guest": None,
                               "frames_from_guest": None}]
    run(tmp_path, body)


def test_socket_file(tmp_path):
    path = tmp_path / "ctl"

    def body(rig):
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        with pytest.raises(ControlError, match="in use"):
            ControlServer(rig.loop, str(path), mode="passt", forwarders={},
                          families=(4,)).open()
    run(tmp_path, body)
    assert not path.exists()                       # removed at close
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()                                  # a socket nobody listens on
    run(tmp_path, lambda rig: None)
    path.write_text("not a socket")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        run(tmp_path, lambda rig: None)
    assert path.read_text() == "not a socket"


# ---------------------------------------------------------------- pesto's command line


def ops(*argv: str) -> list[dict]:
    found, rest = getopt(list(argv) + ["/x"], OPTIONS)
    assert rest == ["/x"]
    return build_ops(found)


def test_pesto_ops_follow_c_pesto():
    assert ops() == []
    assert ops("-t", "1024", "-U", "1025") == [           # replace: clear each table first
        {"op": "clear", "table": "HOST"}, {"op": "add", "option": "-t", "spec": "1024"},
        {"op": "clear", "table": "SPLICE"}, {"op": "add", "option": "-U", "spec": "1025"}]
    assert ops("-A", "-t", "2000", "-D", "-t", "3000", "-U", "5000") == [
        {"op": "add", "option": "-t", "spec": "2000"},
        {"op": "delete", "option": "-t", "spec": "3000"},
        {"op": "delete", "option": "-U", "spec": "5000"}]
    assert ops("-A", "-t", "2000", "-C", "HOST", "-A", "-T", "3000", "-t", "2001",
               "-D", "-u", "5000") == [
        {"op": "add", "option": "-t", "spec": "2000"}, {"op": "clear", "table": "HOST"},
        {"op": "add", "option": "-T", "spec": "3000"},
        {"op": "add", "option": "-t", "spec": "2001"},
        {"op": "delete", "option": "-u", "spec": "5000"}]
    assert ops("--add", "--tcp-ports=0.0.0.0/8080:80", "-t", "[::]/8080:80") == [
        {"op": "add", "option": "-t", "spec": "0.0.0.0/8080:80"},
        {"op": "add", "option": "-t", "spec": "[::]/8080:80"}]


def test_pesto_formats():
    assert format_tables({"HOST": {"tcp": ["[*]:22 => 22"], "udp": []},
                          "SPLICE": {"tcp": [], "udp": []}}) == (
        "HOST (-t/-u):\n    TCP [*]:22 => 22\nSPLICE (-T/-U):\n    (none)")
    text = format_flows([{"proto": "udp", "path": "splice", "guest": "127.0.0.1:53",
                          "host": "127.0.0.1:4444", "inbound": False, "to_guest": None,
                          "from_guest": 3, "age": 0.25}])
    assert text.splitlines()[1].split() == ["udp", "splice", "out", "127.0.0.1:53",
                                            "127.0.0.1:4444", "-", "3", "0.2s", "-", "-"]


def test_pesto_usage_errors(capsys):
    from pesto.cli import main
    assert main(["-X", "/x"]) == 1
    assert capsys.readouterr().err == "pesto: invalid option -- 'X'\n"
    assert main([]) == 1
    assert capsys.readouterr().err == "pesto: missing control socket PATH\n"
    assert main(["/nonexistent/ctl"]) == 1
    assert capsys.readouterr().err == (
        "pesto: cannot connect to /nonexistent/ctl: No such file or directory\n")
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("pesto ")
    assert main(["-h"]) == 0 and "Usage: pesto [OPTION]... PATH" in capsys.readouterr().out
    time.sleep(0)


def test_policy_show_and_replace_all_or_nothing(tmp_path):
    def body(rig):
        rig.gate.policy.decide(TCP, bytes([192, 0, 2, 7]), 443, 0)
        shown = rig.request([{"op": "policy"}])["policy"]
        assert shown["rules"] == [{"n": 1, "rule": "deny tcp:192.0.2.0/24:443", "flows": 1}]
        assert shown["default"] == "deny" and shown["deny_action"] == "reset"
        text = "allow tcp:192.0.2.0/24:443\nallow udp:host.test:53  # resolved by pesto\n"
        r = rig.request([{"op": "policy", "text": text, "source": "policy file P",
                          "resolved": {"host.test": ["198.51.100.5", "2001:db8::5"]}}])
        assert [x["rule"] for x in r["policy"]["rules"]] == [
            "allow tcp:192.0.2.0/24:443", "allow udp:host.test:53"]
        assert r["policy"]["default"] == "deny"          # kept: the file did not say
        assert rig.gate.policy.decide(TCP, bytes([192, 0, 2, 7]), 443, 0).allow
        # a bad line: an error naming it, and the policy in force unchanged
        for bad, said in (("allow tcp:192.0.2.0/24:443\ndeny tcp:10.0.0.0/33\n",
                           "policy file Q line 2: deny tcp:10.0.0.0/33: invalid prefix"),
                          ("allow udp:other.test:53\n", "policy file Q line 1: allow "
                           "udp:other.test:53: cannot resolve host name 'other.test': not "
                           "resolved by the client")):
            r = rig.request([{"op": "policy", "text": bad, "source": "policy file Q"}])
            assert r["ok"] is False and r["error"].startswith("policy file Q line "), r
            assert said in r["error"] and "\n" not in r["error"]
        assert len(rig.gate.policy.rules) == 2
        # with a forwarding change that fails, the policy is not replaced either
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", 7301))
        blocker.listen()
        r = rig.request([{"op": "add", "option": "-t", "spec": "127.0.0.1/7301"},
                         {"op": "policy", "text": "default allow\n", "source": "x"}])
        blocker.close()
        assert r["ok"] is False and rig.gate.policy.default == "deny"
        r = rig.request([{"op": "policy", "text": 5}])
        assert r["ok"] is False and "strings" in r["error"]
    run(tmp_path, body)


def test_pesto_policy_op_and_format(tmp_path):
    f = tmp_path / "p"
    f.write_text("# egress\nallow tcp:svc.test:443\ndefault deny\n")
    op = policy_op(str(f), resolve=lambda name: ["192.0.2.80"])
    assert op == {"op": "policy", "text": f.read_text(), "source": f"policy file {f}",
                  "resolved": {"svc.test": ["192.0.2.80"]}}
    f.write_text("allow tcp:svc.test:443\ndeny udp:*:0\n")
    with pytest.raises(Exception, match=r"line 2: deny udp:\*:0: port 0 is not allowed"):
        policy_op(str(f), resolve=lambda name: ["192.0.2.80"])
    text = format_policy({"default": "deny", "deny_action": "drop", "inbound": False,
                          "rules": [{"n": 1, "rule": "allow tcp:svc.test:443", "flows": 12}],
                          "dns_forward_flows": 3, "default_flows": 4,
                          "learned": [{"addr": "192.0.2.9", "name": "a.test", "rule": 1,
                                       "expires_in": 29.6}]})
    assert text.splitlines() == [
        "policy: default deny, denied flows dropped, forwarded ports not checked",
        "       #  FLOWS  RULE",
        "       1     12  allow tcp:svc.test:443",
        "       -      3  (DNS to --dns-forward)",
        "       -      4  default deny",
        "learned from DNS answers:",
        "    192.0.2.9  a.test  rule 1, 30 s left"]
