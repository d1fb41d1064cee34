"""``python -m repfx ...`` is the ``repfx`` command."""

import sys

from .cli import main

sys.exit(main())
