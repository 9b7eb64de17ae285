"""``python -m papa``: the ``papa`` command."""

from papa.cli import main

raise SystemExit(main())
