"""``python -m app.client``: see ``app.client.agent``."""

import sys

from app.client.agent import main

sys.exit(main())
