"""``python -m pica.cli``."""

import sys

from . import main

sys.exit(main())
