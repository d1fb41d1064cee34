"""``python -m repfx.cli ...`` is the ``repfx`` command, as ``python -m repfx ...`` is."""

import sys

from . import main

sys.exit(main())
