"""``python -m hil``: the ``hil`` command line."""

import sys

from hil.cli import main

sys.exit(main())
