"""``python -m offload_export``: the ``offload-export`` command."""

import sys

from .cli import main

sys.exit(main())
