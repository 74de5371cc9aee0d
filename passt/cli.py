"""`passt`: networking for QEMU guests over a UNIX stream socket.

The command line is complete (libvirt's and people's invocations parse);
serving a guest arrives with the passt issue, until then passt says so and
exits non-zero.
"""

from __future__ import annotations

import sys

from common.options import main_parse

VERSION = "0.1.0"


def main(argv: list[str] | None = None) -> int:
    opts = main_parse("passt", argv)
    if opts.get("version"):
        print(f"passt {VERSION} (passt for Python)")
        return 0
    print("passt: serving virtual machines is not implemented yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
