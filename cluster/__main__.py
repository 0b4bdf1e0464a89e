"""`python -m cluster ...` is `raysweep ...` (useful where the console script is not installed)."""

import sys

from cluster.cli import main

sys.exit(main())
