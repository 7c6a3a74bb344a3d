"""``python -m app.bench server|scale``: see ``app.bench.cli``."""

import sys

from app.bench.cli import main

sys.exit(main())
