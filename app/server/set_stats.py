"""What one SET counts: named counters, shakes per second by result, loop health.

Shakes are counted twice per second: by the second the client stamped in
the frame (``by_sent``, the "scheduled" check) and by arrival here
(``by_arrival``, what was served in each second). Rows are lists indexed by
``CODE_INDEX``; the last ``SECONDS_KEPT`` seconds are kept, and ``/stats``
ships only the seconds from its ``since``.
"""

from __future__ import annotations

from app import protocol as p
from app.metrics.statsd import Metrics

# per-second history for /stats: a one-million bench with a ramp (seven 60 s tries) runs
# past 300 s, and its first phase's seconds were gone by the time it collected them
SECONDS_KEPT = 900
TIMESTAMP_SLACK = 60  # a frame timestamp further than this from our clock counts by arrival
CODE_INDEX = {int(p.ShakeCode.GOT): 0, int(p.ShakeCode.NONE_LEFT): 1,
              int(p.ShakeCode.REFUSED): 2, int(p.ShakeCode.OVERLOAD): 3}
SHAKE_METRIC = ("shakes.14", "shakes.15", "shakes.16", "shakes.17")
GOT, NONE_LEFT, OVERLOAD = (int(c) for c in (p.ShakeCode.GOT, p.ShakeCode.NONE_LEFT,
                                             p.ShakeCode.OVERLOAD))


class SetStats:
    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.by_sent: dict[int, list[int]] = {}
        self.by_arrival: dict[int, list[int]] = {}
        # (loop lag, GC pause, the GC's own CPU) ms
        self.health_by_second: dict[int, tuple[float, float, float]] = {}
        self.shake_totals = [0, 0, 0, 0]  # by code index, since start (to statsd as deltas)
        self._shake_flushed = [0, 0, 0, 0]

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def shake(self, code: int, sent: int, second: int) -> None:
        """One SHAKE answered with ``code``: by the client's second and by arrival."""
        index = CODE_INDEX[code]
        if abs(sent - second) > TIMESTAMP_SLACK:
            sent = second
        _row(self.by_sent, sent)[index] += 1
        _row(self.by_arrival, second)[index] += 1
        self.shake_totals[index] += 1

    def shakes(self, sents: list[int], granted: int, allowed: int, second: int) -> None:
        """A batch of SHAKEs answered in order: ``granted`` GOT, then NONE_LEFT up to
        ``allowed``, the rest OVERLOAD — the same counts as ``shake`` per entry."""
        n = len(sents)
        if not n:
            return
        row = [granted, allowed - granted, 0, n - allowed]
        if sents.count(second) != n:  # stamped in other seconds too: one by one
            for i, sent in enumerate(sents):
                code = GOT if i < granted else NONE_LEFT if i < allowed else OVERLOAD
                self.shake(code, sent, second)
            return
        for have in (_row(self.by_sent, second), _row(self.by_arrival, second),
                     self.shake_totals):
            for i in range(4):
                have[i] += row[i]

    def end_second(self, now: float, metrics: Metrics, lag: float, pause: float,
                   pause_cpu: float) -> None:
        """Once a second: drop old rows, send shake deltas, record loop health."""
        horizon = int(now) - SECONDS_KEPT
        for table in (self.by_sent, self.by_arrival, self.health_by_second):
            for old in [s for s in table if s < horizon]:
                del table[old]
        for i, name in enumerate(SHAKE_METRIC):
            metrics.incr(name, self.shake_totals[i] - self._shake_flushed[i])
        self._shake_flushed = list(self.shake_totals)
        self.health_by_second[int(now) - 1] = (lag, pause, pause_cpu)

    def tables(self, since: int = 0) -> dict:
        """The per-second tables from second ``since`` on (all kept seconds for 0)."""
        return {
            "counters": dict(self.counters),
            "by_sent": {str(s): v for s, v in self.by_sent.items() if s >= since},
            "by_arrival": {str(s): v for s, v in self.by_arrival.items() if s >= since},
            "health": {str(s): v for s, v in self.health_by_second.items() if s >= since},
        }


def _row(table: dict[int, list[int]], second: int) -> list[int]:
    """The counts by code index of ``second`` in ``table`` (a new zero row if none yet)."""
    row = table.get(second)
    if row is None:
        row = table[second] = [0, 0, 0, 0]
    return row
