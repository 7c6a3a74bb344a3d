"""Who is asked when: the rotating-window scheduler, pure arithmetic, no I/O.

Coordinated load without a coordinator. Every host knows its share ``q`` of
the fleet-wide QPS, its ``n`` users (positions ``0..n-1``, userid ``first +
position``) and the wall-clock second ``t``. In second ``t`` it asks the
``q`` consecutive positions starting at ``t*q mod n`` (wrapping). Second
``t+1`` starts where second ``t`` ended, so the window sweeps the range:
every user is asked once per ``n/q`` seconds, all equally often, and any
``ceil(n/q)`` consecutive seconds cover every user.

Within the second the window is cut into ``ticks`` slices aligned to the
wall clock (the same ticks on every host). ``even`` pacing spreads it over
the first ``A = T - quiet`` ticks: tick ``k < A`` gets the positions
``[k*q//A, (k+1)*q//A)`` of the window, so the slices sum to exactly ``q``,
and the last ``quiet`` ticks send nothing (``quiet_ticks``: the slack a late
pacer has before its requests would arrive in the next second); ``burst``
puts the whole window in tick 0 (the classic client's behaviour).

A host's processes each own a contiguous part ``[a, b)`` of the positions;
they all compute the same host-wide span and send only the part inside
their own — so the host sends exactly ``q`` whatever its process count, and
the cost of a tick is O(requests), never O(connections).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from app.shares import share

__all__ = ["Timeline", "clip", "quiet_ticks", "second_count", "share", "split", "tick_span"]

LATEST = float("inf")  # sorts after every insertion number: bisect to the last change of a tick


class Timeline:
    """A host's QPS changes by the tick they apply from: the latest change due wins.

    Changes may be added out of order (a /qps for an earlier second after one
    for a later second). The QPS in effect at tick ``k`` is that of the change
    with the greatest tick <= ``k``; of two changes for the same tick, the one
    added last. The agent keeps the whole timeline (``target`` of a past
    second); a (re)started worker gets ``upcoming`` and applies each change at
    its own tick, never a future one at once.
    """

    def __init__(self, changes: Iterable[tuple[int, int]] = ()) -> None:
        self.changes: list[tuple[int, float, int]] = []  # (tick, insertion number, qps)
        for tick, qps in changes:
            self.add(tick, qps)

    def add(self, tick: int, qps: int) -> None:
        bisect.insort(self.changes, (tick, len(self.changes), qps))

    def at(self, tick: int) -> int:
        """The QPS in effect at ``tick`` (0 before the first change)."""
        i = bisect.bisect_right(self.changes, (tick, LATEST))
        return self.changes[i - 1][2] if i else 0

    def pending(self, tick: int) -> bool:
        """Is a change due after ``tick``?"""
        return bool(self.changes) and self.changes[-1][0] > tick

    def upcoming(self, tick: int) -> list[tuple[int, int]]:
        """The change in effect at ``tick`` (as from ``tick``) and every later one, in order."""
        i = bisect.bisect_right(self.changes, (tick, LATEST))
        return [(tick, self.at(tick))] + [(t, q) for t, _, q in self.changes[i:]]


def quiet_ticks(ticks: int, quiet_ms: int) -> int:
    """How many of a second's last ``ticks`` send nothing: at least ``quiet_ms``, one sends.

    Why a quiet end: a second's requests are judged by the second they
    arrive in at the server. Co-located clients (the scale bench: 17 hosts'
    agents on the server's two cores, niced) get to their ticks up to a few
    hundred ms late, and a tick sent after its second has ended cannot arrive
    within it; a skewed client clock does the same on a real fleet. Measured
    at 200k connections and 60,000/s (docs/benchmarks-history.rst): with the last
    tick 50 ms before the second's end the clients sent 7,600-11,700 of a
    30 s phase's requests after their second, with 100 ms quiet 200-2,000.
    """
    return min(ticks - 1, max(0, -(-quiet_ms * ticks // 1000)))


def tick_span(second: int, tick: int, qps: int, n: int, ticks: int,
              pacing: str = "even", quiet: int = 0) -> tuple[int, int]:
    """``(start, count)``: the window positions asked in ``tick`` of ``second``.

    Positions are ``start, start+1, ... start+count-1`` modulo ``n``. ``quiet``:
    the last ticks of the second that send nothing (``quiet_ticks``).
    """
    if n < 1 or qps <= 0:
        return 0, 0
    if pacing == "burst":
        lo, hi = (0, qps) if tick == 0 else (0, 0)
    else:
        active = ticks - quiet
        lo, hi = min(tick, active) * qps // active, min(tick + 1, active) * qps // active
    return (second * qps + lo) % n, hi - lo


def clip(start: int, count: int, n: int, a: int, b: int) -> list[tuple[int, int]]:
    """The half-open position ranges of the circular span that fall in ``[a, b)``.

    A span longer than ``n`` (more QPS than users) covers ``[a, b)`` once per
    full turn, so a user can be asked more than once in a tick then.
    """
    out: list[tuple[int, int]] = []
    if count <= 0 or a >= b:
        return out
    turns, rest = divmod(count, n)
    out.extend([(a, b)] * turns)
    if rest:
        end = start + rest
        pieces = ((start, end),) if end <= n else ((start, n), (0, end - n))
        for lo, hi in pieces:
            lo, hi = max(lo, a), min(hi, b)
            if lo < hi:
                out.append((lo, hi))
    return out


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """Cut positions ``0..n-1`` into ``parts`` contiguous near-equal ranges."""
    if parts < 1:
        raise ValueError("parts must be >= 1")
    return [(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


def second_count(qps: int, n: int, a: int, b: int, second: int, ticks: int,
                 pacing: str = "even", quiet: int = 0) -> int:
    """How many requests positions ``[a, b)`` send in ``second`` (for tests and checks)."""
    total = 0
    for k in range(ticks):
        start, count = tick_span(second, k, qps, n, ticks, pacing, quiet)
        total += sum(hi - lo for lo, hi in clip(start, count, n, a, b))
    return total
