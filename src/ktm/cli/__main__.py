"""``python -m ktm.cli ...`` (and ``accelerate launch -m ktm.cli ...``): the same as ``ktm ...``."""

import sys

from . import main

sys.exit(main())
