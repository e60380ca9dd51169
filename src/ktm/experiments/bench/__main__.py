"""``python -m ktm.experiments.bench speed ...``: the same as ``ktm bench speed ...``."""

import sys

from . import main

sys.exit(main())
