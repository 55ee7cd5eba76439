"""``python -m xnnq.cli``: the same as the ``xnnq`` console script."""

import sys

from .commands import main

sys.exit(main())
