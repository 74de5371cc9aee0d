"""`qrap`: connect QEMU to a passt socket through an inherited file descriptor.

Not implemented yet: it arrives with the passt issue.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("qrap: not implemented yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
