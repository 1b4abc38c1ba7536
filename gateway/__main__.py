"""``python -m gateway`` is the ``infergate`` command."""

import sys

from gateway.cli import main

sys.exit(main())
