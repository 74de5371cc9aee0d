"""The flow log writer (common.flowlog): buffered, whole JSON lines, capped like
--log-size, and never blocking on a full pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from common.flowlog import BUFFER_MAX, FLUSH_AT, FlowLog


def rec(i: int) -> dict:
    return {"event": "close", "id": i, "proto": "tcp", "guest": "10.0.0.2:40000",
            "host": "192.0.2.1:443", "to_guest": i * 1000, "pad": "x" * 60}


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_buffered_until_flushed(tmp_path):
    path = tmp_path / "flows"
    log = FlowLog.open(str(path), 1 << 20)
    log.add(rec(1))
    log.add(rec(2))
    assert path.read_text() == ""                # nothing written per record
    log.flush()
    assert [r["id"] for r in lines(path)] == [1, 2]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    for i in range(3, 3 + FLUSH_AT // 100 + 10):   # a full buffer writes by itself
        log.add(rec(i))
    assert len(lines(path)) > 2
    log.add(rec(99999))
    log.close()                                  # and the rest at close
    assert lines(path)[-1]["id"] == 99999


def test_cap_keeps_the_newest_whole_lines(tmp_path):
    path = tmp_path / "flows"
    path.write_text('{"old": 1}\n')              # appended to, like -l
    cap = 8192
    log = FlowLog.open(str(path), cap)
    for i in range(500):
        log.add(rec(i))
        if i % 7 == 0:
            log.flush()
        assert path.stat().st_size <= cap
    log.close()
    got = lines(path)                            # every line whole JSON
    assert got[-1]["id"] == 499 and path.stat().st_size <= cap
    ids = [r["id"] for r in got]
    assert ids == list(range(ids[0], 500)) and len(ids) > 20
    assert log.shrunk > 0


def test_one_flush_larger_than_half_the_cap(tmp_path):
    path = tmp_path / "flows"
    log = FlowLog.open(str(path), 4096)
    for i in range(200):
        log.add(rec(i))
    log.close()
    got = lines(path)
    assert got[-1]["id"] == 199 and path.stat().st_size <= 2048 and log.dropped > 100


def test_symlink_refused_as_root_and_directory_refused(tmp_path):
    (tmp_path / "target").write_text("")
    os.symlink(tmp_path / "target", tmp_path / "link")
    for path, word in ((tmp_path / "link", "symbolic link"), (tmp_path, "")):
        try:
            FlowLog.open(str(path), 4096)
        except OSError as exc:
            assert word in str(exc) or exc.errno
        else:
            raise AssertionError(f"{path} accepted")


WRITER = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
from common.flowlog import FlowLog
log = FlowLog.open("-", 0)
t = time.monotonic()
for i in range(20000):
    log.add({"id": i, "pad": "y" * 200})
    log.flush()
log.close()
print(f"{time.monotonic() - t:.3f} {log.dropped}", file=sys.stdout, flush=True)
"""


def test_stderr_pipe_nobody_reads_never_blocks():
    """-: a pipe whose reader does not read fills up; records are dropped, never waited on."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.Popen([sys.executable, "-c", WRITER, root], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        out = ""
        while time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.05)
        assert p.poll() is not None, "the writer blocked on a full pipe"
        out = p.stdout.read()
        took, dropped = out.split()
        assert int(dropped) > 0 and float(took) < 20
        first = p.stderr.readline()
        assert json.loads(first)["id"] == 0
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stdout.close()
        p.stderr.close()


def test_stderr_file_is_appended(tmp_path):
    out = tmp_path / "err"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from common.flowlog import FlowLog; "
            "sys.stderr.write('before\\n'); sys.stderr.flush(); "
            "log = FlowLog.open('-', 0); log.add({'id': 1}); log.close()")
    with open(out, "w") as f:
        subprocess.run([sys.executable, "-c", code, root], stderr=f, check=True)
    assert out.read_text() == 'before\n{"id":1}\n'


def test_buffer_is_bounded():
    r, w = os.pipe()
    os.set_blocking(w, False)
    log = FlowLog(w, cap=None, name="pipe")
    for i in range(BUFFER_MAX // 50):
        log.add({"id": i, "pad": "z" * 60})
    assert len(log.buf) <= BUFFER_MAX and log.dropped > 0
    log.close()
    os.close(r)
