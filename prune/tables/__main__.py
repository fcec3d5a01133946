"""``python -m prune.tables``: the command line of ``prune.tables.cli``."""

import sys

from prune.tables.cli import main

sys.exit(main())
