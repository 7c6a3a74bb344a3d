"""``python -m app.server``: see ``app.server.main``."""

import sys

from app.server.main import main

sys.exit(main())
