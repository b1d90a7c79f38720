"""``python -m stimg.cli``."""

import sys

from . import main

sys.exit(main())
