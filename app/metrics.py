"""In-process metric aggregation, flushed to statsd once a second.

Why aggregate: a SET serving 60,000 shakes/s cannot afford a UDP datagram
per event. Counters are plain dict increments on the hot path; a flusher
greenlet turns them into one batch of statsd lines per second (packed into
datagrams by the ``statsd`` package's pipeline). Sending never raises into
the serving code: a daemon that is down or unreachable costs nothing but
the lost datagrams.

Names (all under ``hongbao.``) are documented in README.rst, section
"Metrics". Counters are summed by statsd across processes, so every SET or
client process sends the same counter names; gauges would overwrite each
other, so gauge names carry the process's own id (``set.3``, ``p0``).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import gevent
import statsd

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 1.0  # seconds; Graphite stores 1 s points, so one flush per point


class Metrics:
    """Counters and gauges of one process, flushed as one statsd batch a second."""

    def __init__(self, prefix: str, address: str | None = None) -> None:
        self.prefix = prefix
        self.counters: defaultdict[str, int] = defaultdict(int)
        self.gauges: dict[str, float] = {}
        self._client: statsd.StatsClient | None = None
        self._greenlet: gevent.Greenlet | None = None
        if address:
            host, _, port = address.rpartition(":")
            try:
                self._client = statsd.StatsClient(host or "127.0.0.1", int(port), prefix=prefix)
            except OSError as exc:  # unresolvable host: serve without metrics
                log.warning("statsd %s unusable (%s); metrics disabled", address, exc)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def incr(self, name: str, count: int = 1) -> None:
        self.counters[name] += count

    def gauge(self, name: str, value: float) -> None:
        self.gauges[name] = value

    def start(self) -> None:
        """Start the once-a-second flusher (no-op without a statsd address)."""
        if self._client is not None and self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None
        self.flush()

    def _run(self) -> None:
        # Flush just after each wall-clock second so points land in the right
        # Graphite second on every host (clocks are NTP-synced).
        while True:
            now = time.time()
            gevent.sleep(FLUSH_INTERVAL - (now % FLUSH_INTERVAL) + 0.01)
            self.flush()

    def flush(self) -> None:
        """Send what accumulated since the last flush; never raises."""
        if self._client is None:
            self.counters.clear()
            return
        counters, self.counters = self.counters, defaultdict(int)
        gauges = dict(self.gauges)
        try:
            pipe = self._client.pipeline()
            for name, value in counters.items():
                if value:
                    pipe.incr(name, value)
            for name, value in gauges.items():
                pipe.gauge(name, value)
            pipe.send()
        except OSError as exc:
            log.debug("statsd send failed: %s", exc)
