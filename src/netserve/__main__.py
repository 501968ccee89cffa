"""``python -m netserve``: the same as the ``netserve`` command."""

import sys

from netserve._cli import main

sys.exit(main())
