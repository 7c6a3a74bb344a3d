"""Process and host gauges: GC pause, event-loop lag, network packets/bytes per second.

Why: the classic prototype proved its server healthy with GC pauses under
10 ms and watched the wire with ethtool; a gevent server's equivalent
warnings are a late event loop (a greenlet that did not yield) and long
cyclic-GC pauses. Each gauge is the worst (or the rate) over the last
flush interval, computed by a collector the Metrics object calls right
before it flushes, so the value in Graphite's point t describes exactly the
second that point covers.

How a process uses it::

    metrics = Metrics("hongbao.server", statsd_address)
    watch = sysmetrics.start(metrics, prefix=f"set.{set_id}.")   # GC + loop lag
    metrics.start()
    ...
    watch.stop()

    net = Metrics(f"hongbao.net.{host}", statsd_address)       # once per host
    sysmetrics.start(net, gc=False, loop=False, net=True)
    net.start()

Gauges: ``<prefix>gc_pause_ms``, ``<prefix>loop_lag_ms`` and, with
``net=True``, ``<iface>.packets_in|packets_out|bytes_in|bytes_out`` (per
second; dots in interface names become underscores).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterable

import gevent
import psutil

from app.metrics.statsd import Metrics

LAG_PROBE_INTERVAL = 0.1  # s; 10 wake-ups a second cost nothing next to a SET's 100 ticks


class GCPauses:
    """Longest cyclic-GC pause since the last take(), from gc.callbacks.

    A pause is wall time: what the process's loop waited. On a busy box that
    includes time the collecting process was not running at all, so the
    collector's own CPU time is kept beside it (``last_cpu_ms``).
    """

    def __init__(self) -> None:
        self._started = 0.0
        self._cpu_started = 0.0
        self.worst = 0.0  # seconds
        self.worst_cpu = 0.0  # seconds: the most CPU one collection took
        self.total = 0.0  # seconds, since the last take()
        self.collections = 0
        self.last_cpu_ms = 0.0  # worst_cpu of the window the last take() closed

    def __call__(self, phase: str, info: dict) -> None:
        # Runs inside the collector: keep it to clock reads and compares.
        if phase == "start":
            self._started = time.perf_counter()
            self._cpu_started = time.thread_time()
        elif phase == "stop" and self._started:
            pause = time.perf_counter() - self._started
            cpu = time.thread_time() - self._cpu_started
            self._started = 0.0
            self.total += pause
            self.collections += 1
            if pause > self.worst:
                self.worst = pause
            if cpu > self.worst_cpu:
                self.worst_cpu = cpu

    def take(self) -> float:
        """Worst pause in ms since the last call; resets. The most CPU one collection
        of that window took goes to ``last_cpu_ms``."""
        worst, self.worst, self.total, self.collections = self.worst, 0.0, 0.0, 0
        self.last_cpu_ms, self.worst_cpu = self.worst_cpu * 1000.0, 0.0
        return worst * 1000.0


class LoopLag:
    """How late the gevent hub wakes a sleeping greenlet: the worst since the last take()."""

    def __init__(self, interval: float = LAG_PROBE_INTERVAL) -> None:
        self.interval = interval
        self.worst = 0.0  # seconds
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None

    def _run(self) -> None:
        while True:
            before = time.monotonic()
            gevent.sleep(self.interval)
            self.observe(time.monotonic() - before - self.interval)

    def observe(self, late: float) -> None:
        """Count a lateness (s) measured by a timer loop of the caller's own.

        A process whose loop already wakes on a timer (a SET's generation
        ticks) feeds that instead of starting the probe: one wake-up less
        every ``interval`` in each of up to 51 SETs.
        """
        if late > self.worst:
            self.worst = late

    def take(self) -> float:
        """Worst lateness in ms since the last call; resets."""
        worst, self.worst = self.worst, 0.0
        return max(worst, 0.0) * 1000.0


class NetRates:
    """Per-interface packets and bytes per second between two take() calls (psutil)."""

    def __init__(self, interfaces: Iterable[str] | None = None) -> None:
        self.interfaces = set(interfaces) if interfaces else None
        self._last = self._read()
        self._when = time.monotonic()

    def _read(self) -> dict[str, tuple[int, int, int, int]]:
        counters = psutil.net_io_counters(pernic=True)
        return {name: (c.packets_recv, c.packets_sent, c.bytes_recv, c.bytes_sent)
                for name, c in counters.items()
                if self.interfaces is None or name in self.interfaces}

    def take(self) -> dict[str, dict[str, float]]:
        """{iface: {packets_in, packets_out, bytes_in, bytes_out}} per second since last call."""
        now, current = time.monotonic(), self._read()
        elapsed = max(now - self._when, 1e-3)
        rates = {}
        for name, values in current.items():
            old = self._last.get(name)
            if old is None:
                continue
            # Counters can wrap or reset (interface re-created): report 0, not negative.
            deltas = [max(v - o, 0) / elapsed for v, o in zip(values, old, strict=True)]
            rates[name] = dict(zip(("packets_in", "packets_out", "bytes_in", "bytes_out"),
                                   deltas, strict=True))
        self._last, self._when = current, now
        return rates


class SysMetrics:
    """The collectors one process registered on its Metrics; stop() unregisters them."""

    def __init__(self, metrics: Metrics, prefix: str = "", *, gc_pauses: bool = True,
                 loop: bool = True, net: bool = False,
                 interfaces: Iterable[str] | None = None) -> None:
        self.metrics = metrics
        self.prefix = prefix
        self.gc = GCPauses() if gc_pauses else None
        self.lag = LoopLag() if loop else None
        self.net = NetRates(interfaces) if net else None

    def start(self) -> SysMetrics:
        if self.gc is not None and self.gc not in gc.callbacks:
            gc.callbacks.append(self.gc)
        if self.lag is not None:
            self.lag.start()
        self.metrics.add_collector(self.collect)
        return self

    def stop(self) -> None:
        if self.gc is not None and self.gc in gc.callbacks:
            gc.callbacks.remove(self.gc)
        if self.lag is not None:
            self.lag.stop()
        self.metrics.remove_collector(self.collect)

    def collect(self, metrics: Metrics) -> None:
        """Set this second's gauges (called by Metrics.flush)."""
        if self.gc is not None:
            metrics.gauge(f"{self.prefix}gc_pause_ms", round(self.gc.take(), 3))
        if self.lag is not None:
            metrics.gauge(f"{self.prefix}loop_lag_ms", round(self.lag.take(), 3))
        if self.net is not None:
            for iface, rates in self.net.take().items():
                name = sanitize(iface)
                for key, value in rates.items():
                    metrics.gauge(f"{self.prefix}{name}.{key}", round(value, 1))


def sanitize(part: str) -> str:
    """One Graphite path component: no dots, only characters statsd keeps."""
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in part)


def start(metrics: Metrics, prefix: str = "", *, gc: bool = True, loop: bool = True,
          net: bool = False, interfaces: Iterable[str] | None = None) -> SysMetrics:
    """Register GC-pause, loop-lag and (net=True) network collectors on metrics.

    prefix ends with a dot when given (``"set.3."``, ``"p0."``). Call before or
    after ``metrics.start()``; the gauges appear from the next flush on.
    """
    return SysMetrics(metrics, prefix, gc_pauses=gc, loop=loop, net=net,
                      interfaces=interfaces).start()
