"""`python -m pesto`."""

import sys

from pesto.cli import main

sys.exit(main())
