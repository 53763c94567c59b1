"""``python -m benchmarks``: see :mod:`benchmarks.runner`."""

import sys

from .runner import main

sys.exit(main())
