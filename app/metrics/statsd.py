"""In-process metric aggregation, flushed to statsd once a second.

Why aggregate: a SET serving 60,000 shakes/s cannot afford a UDP datagram
per event. Counters are plain dict increments on the hot path; a flusher
greenlet turns them into one batch of statsd lines per second (packed into
datagrams by the ``statsd`` package's pipeline). Sending never raises into
the serving code: a daemon that is down or unreachable costs nothing but
the lost datagrams.

When: statsd (monitor/conf/statsd.js) flushes on whole seconds and stamps
each flush with its second. A process flushing right after the whole second
would race it: a statsd flush late by 10 ms moves a whole second of counts
into the neighbouring point. So every process flushes at the half second,
500 ms from statsd's flush either way; the point stamped t holds the events
counted in [t-1.5, t-0.5) (monitor.report explains how it draws them).

Gauges that summarise the last second (loop lag, GC pause, packets/s) are
computed by collectors (``add_collector``, see app.metrics.system) that run
right before each flush.

Names (all under ``hongbao.``) are documented in README.rst, section
"Metrics". Counters are summed by statsd across processes, so every SET or
client process sends the same counter names; gauges would overwrite each
other, so gauge names carry the process's own id (``set.3``, ``p0``).
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable

import gevent
import statsd

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 1.0  # seconds; Graphite stores 1 s points, so one flush per point
FLUSH_PHASE = 0.5  # seconds after the whole second: farthest from statsd's own flush


class Metrics:
    """Counters and gauges of one process, flushed as one statsd batch a second."""

    def __init__(self, prefix: str, address: str | None = None) -> None:
        self.prefix = prefix
        self.counters: defaultdict[str, int] = defaultdict(int)
        self.gauges: dict[str, float] = {}
        self._client: statsd.StatsClient | None = None
        self._greenlet: gevent.Greenlet | None = None
        self._collectors: list[Callable[[Metrics], None]] = []
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

    def add_collector(self, collect: Callable[[Metrics], None]) -> None:
        """Call collect(self) before every flush, to set the gauges of the last second."""
        self._collectors.append(collect)

    def remove_collector(self, collect: Callable[[Metrics], None]) -> None:
        if collect in self._collectors:
            self._collectors.remove(collect)

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
        # Flush at the half second of the wall clock (NTP-synced on every
        # host), so each flush lands in exactly one statsd flush; see above.
        target = _next_phase(time.time())
        while True:
            gevent.sleep(max(0.0, target - time.time()))
            self.flush()
            target += FLUSH_INTERVAL
            if target < time.time():  # stalled past a whole flush: realign
                target = _next_phase(time.time())

    def flush(self) -> None:
        """Send what accumulated since the last flush; never raises."""
        for collect in list(self._collectors):
            try:
                collect(self)
            except Exception:  # a broken collector must not stop the counters
                log.exception("metrics collector %r failed", collect)
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


def _next_phase(now: float) -> float:
    """The first wall-clock time after now that is FLUSH_PHASE past a whole interval."""
    return (math.floor((now - FLUSH_PHASE) / FLUSH_INTERVAL) + 1) * FLUSH_INTERVAL + FLUSH_PHASE
