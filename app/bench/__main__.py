"""``python -m app.bench server|scale``: see ``app.bench.server`` and ``app.bench.scale``."""

import sys

from app.bench.server import main

sys.exit(main())
