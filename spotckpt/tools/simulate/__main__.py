"""``python -m spotckpt.tools.simulate [...] -- CMD``."""

import sys

from spotckpt.tools.simulate import _main

sys.exit(_main())
