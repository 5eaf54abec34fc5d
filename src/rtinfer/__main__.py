"""``python -m rtinfer``: the same as the ``rtinfer`` command."""

import sys

from .cli import main

sys.exit(main())
