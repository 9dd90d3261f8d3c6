"""``python -m spotckpt.simulate [...] -- CMD``."""

import sys

from . import _main

sys.exit(_main())
