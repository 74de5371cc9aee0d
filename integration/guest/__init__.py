"""Minimal QEMU test guest for the integration tests: build and cache it, boot it.

`build_guest()` returns the cached kernel and busybox initramfs (see builder.py);
`run_guest()` boots it with a per-run script under TCG and returns its exit status and
console (see run.py).
"""

from .builder import GuestBuildError, GuestImage, build_guest, default_cache_dir
from .run import GuestResult, run_guest

__all__ = ["GuestBuildError", "GuestImage", "GuestResult", "build_guest",
           "default_cache_dir", "run_guest"]
