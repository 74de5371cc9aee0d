"""Files we open for writing at a path the user gave: the pid file (-P), the log
file (-l) and the capture file (-p).

Started as root, we open them before giving root up (the directory may be
root's), and a path in a directory others can write may have been replaced
by a symbolic link to a file of root's: following it would truncate or
append to that file.  So as root the last component is never followed
(O_NOFOLLOW), and a link there is refused with one line.  The files are
created mode 0600: a pid file or a capture is nobody else's business.
Everything later goes through the descriptor, never the path again (we may
no longer be allowed to open it).
"""

from __future__ import annotations

import errno
import os


def open_for_write(path: str, flags: int, what: str) -> int:
    """os.open(path, flags | O_CLOEXEC, 0o600), not through a symbolic link when we
    are root; OSError with a one-line message naming `what` and `path` if it fails."""
    nofollow = os.O_NOFOLLOW if os.geteuid() == 0 else 0
    try:
        fd = os.open(path, flags | os.O_CLOEXEC | nofollow, 0o600)
    except OSError as exc:
        if nofollow and exc.errno == errno.ELOOP:
            raise OSError(exc.errno, f"{what} {path} is a symbolic link: not following it "
                          "as root") from None
        raise OSError(exc.errno, f"cannot write {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and st.st_mode & 0o077:
            os.fchmod(fd, 0o600)        # an older file of ours, made with other modes
    except OSError:
        os.close(fd)
        raise
    return fd
