"""`python -m passt` runs the passt command line."""

import sys

from passt.cli import main

sys.exit(main())
