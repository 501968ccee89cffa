"""``python -m netserve``: the same as the ``netserve`` command."""

import sys

from netserve._serving._cli import main

sys.exit(main())
