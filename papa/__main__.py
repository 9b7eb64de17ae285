"""``python -m papa``: the ``papa`` command."""

import sys

from papa.cli import main

sys.exit(main())
