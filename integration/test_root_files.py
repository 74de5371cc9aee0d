"""Files pasta and passt open as root at a path they were given: -P, -l, -p.

Started as root, both open these before switching to nobody.  A path in a
directory others can write may be a symbolic link to a file of root's: it is
refused with one line (never followed), and the file it points to is left
as it was.  The pid file is private (0600).  The log file, opened as root,
keeps being written and capped by size through its descriptor once we are
nobody (who could not open it again).
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess

import pytest

from integration.conftest import our_command, pid_alive, wait_for
from integration.guest.hostnet import socket_dir

OPTIONS = {"-P": "pid file", "-l": "log file", "-p": "capture file"}


def _victim(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    link = tmp_path / "link"
    os.symlink(victim, link)
    return victim, link


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("prog", ["pasta", "passt"])
def test_symlinked_path_is_refused(topo, procs, tmp_path, prog, option):
    victim, link = _victim(tmp_path)
    with socket_dir() as sdir:
        if prog == "pasta":
            argv = [*our_command("pasta"), "--config-net", option, str(link), "--", "true"]
        else:
            argv = [*our_command("passt"), "-f", "-s", str(sdir / "s"), option, str(link)]
        p = procs.start(topo.host.cmd(*argv), text=True)
        try:
            _, err = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{prog} {option} LINK is still running") from None
    assert p.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(link) in lines[0] and "symbolic link" in lines[0], lines[0]
    assert victim.read_text() == "precious\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644


def test_pid_file_is_private(topo, tmp_path):
    pid_file = tmp_path / "pasta.pid"
    pid_file.write_text("")
    pid_file.chmod(0o644)             # an older file: made private too
    r = topo.host.run(*our_command("pasta"), "--config-net", "-P", str(pid_file), "--",
                      "stat", "-c", "%a", str(pid_file))
    assert r.stdout.strip() == "600"
    new = tmp_path / "new.pid"
    r = topo.host.run(*our_command("pasta"), "--config-net", "-P", str(new), "--",
                      "stat", "-c", "%a", str(new))
    assert r.stdout.strip() == "600"


def test_log_is_capped_through_its_descriptor_as_nobody(topo, procs, tmp_path):
    """passt as root becomes nobody; its log lives in root's 0700 directory. Each
    guest connection logs three lines: 100 of them overflow a 4 KiB cap many times,
    and the last lines must still arrive."""
    log = tmp_path / "passt.log"
    os.chmod(tmp_path, 0o700)
    with socket_dir() as sdir:
        sock = sdir / "passt.socket"
        p = procs.start(topo.host.cmd(*our_command("passt"), "-f", "-s", str(sock),
                                      "-l", str(log), "--log-size", "4096"))
        wait_for(lambda: sock.exists() and sock.stat().st_uid != 0, timeout=15,
                 what="passt's socket, handed to nobody")
        # the switch to nobody is part of entering the sandbox, a little after the
        # socket is handed over
        wait_for(lambda: int(open(f"/proc/{p.pid}/status").read().split("Uid:")[1].split()[0])
                 != 0, timeout=10, what="passt to run as nobody")
        text = lambda: log.read_text(errors="replace")  # noqa: E731
        for n in range(1, 101):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
                line = f"guest connected{f' (#{n})' if n > 1 else ''}\n"
                wait_for(lambda line=line: line in text(), interval=0.01,
                         what=f"connection {n} in the log")
            wait_for(lambda: text().endswith("waiting for the next guest\n"), interval=0.01,
                     what=f"disconnection {n} in the log")
        assert log.stat().st_size <= 4096
        assert pid_alive(p.pid)
