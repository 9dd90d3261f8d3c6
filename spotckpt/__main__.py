"""``python -m spotckpt``: the ``spotckpt`` command."""

from spotckpt.tools.cli import main

raise SystemExit(main())
