import sys

from prune.plots import main

sys.exit(main())
