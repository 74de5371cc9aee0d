"""After readiness, whatever ends us is said on the log (`process.serve`)."""

from __future__ import annotations

import logging

from common.process import PidFile, serve


class _Session:
    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.closed = False

    def run(self) -> int:
        if self.fail:
            raise RuntimeError("the loop broke")
        return 7

    def close(self) -> None:
        self.closed = True


def test_unexpected_error_is_logged_and_cleaned_up(tmp_path, caplog):
    pid_file = PidFile(str(tmp_path / "pid"))
    pid_file.write()
    session = _Session(fail=True)
    with caplog.at_level(logging.WARNING):
        assert serve(session, pid_file, "pasta") == 1
    assert session.closed and not (tmp_path / "pid").exists()
    rec = next(r for r in caplog.records if r.levelno == logging.CRITICAL)
    assert "the loop broke" in rec.getMessage() and rec.exc_info


def test_clean_stop_returns_the_loop_code(tmp_path):
    session = _Session(fail=False)
    assert serve(session, PidFile(None), "passt") == 7
    assert session.closed
