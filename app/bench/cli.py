"""``python -m app.bench server|scale ...``: one command for the benchmarks that print figures.

``server`` is ``app.bench.server`` (one SET against a plain gevent server),
``scale`` is ``app.bench.scale`` (the million-connection run); each reads
its own settings table (``[server_bench]``, ``[scale]``).
"""

from __future__ import annotations

import sys

USAGE = "usage: python -m app.bench {server,scale} [--help | settings ...]\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["server"]:
        from app.bench import server

        return server.main(argv[1:])
    if argv[:1] == ["scale"]:
        from app.bench import scale

        return scale.main(argv[1:])
    sys.stderr.write(USAGE)
    return 2
