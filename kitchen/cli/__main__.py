"""``python -m kitchen.cli``: the same as the ``kitchen`` command."""

import sys

from kitchen.cli import entry

sys.exit(entry())
