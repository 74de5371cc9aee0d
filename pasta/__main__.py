"""`python -m pasta` runs the pasta command line."""

import sys

from pasta.cli import main

sys.exit(main())
