"""The ``spotckpt`` command's entry point (``python -m spotckpt.cli`` works too); the command
itself is :mod:`spotckpt.tools.cli`."""

from spotckpt.tools.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
