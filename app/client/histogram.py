"""Latency histogram with log-linear buckets: cheap to record, merge and ship as JSON.

Why buckets and not samples: a process answering thousands of shakes a second
cannot keep every latency, and the parent must merge its children's figures
into host-wide percentiles. Values are integer microseconds; below 16 µs
each value has its own bucket, above it every power of two is cut into 8
linear sub-buckets, so a reported percentile is within ~6% of the truth
(the bucket midpoint) over any range with ~8 buckets per doubling.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

SUB_BITS = 3  # 8 sub-buckets per power of two
SUB = 1 << SUB_BITS
LINEAR = SUB * 2  # values below this are exact


def bucket(us: int) -> int:
    """The bucket index of a latency in microseconds."""
    if us < LINEAR:
        return max(us, 0)
    shift = us.bit_length() - SUB_BITS - 1
    return SUB + shift * SUB + ((us >> shift) & (SUB - 1))


def bounds(index: int) -> tuple[int, int]:
    """The inclusive range ``(low, high)`` of microseconds a bucket holds."""
    if index < LINEAR:
        return index, index
    shift, sub = divmod(index - SUB, SUB)
    low = (SUB + sub) << shift
    return low, low + (1 << shift) - 1


class Histogram:
    """Counts per bucket; ``record`` on the hot path, ``percentile`` when reporting."""

    __slots__ = ("counts", "total")

    def __init__(self, counts: Mapping[int | str, int] | None = None) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0
        if counts:
            self.merge(counts)

    def record(self, us: int) -> None:
        """Count one latency (µs): ``bucket`` inlined, this runs once per answer."""
        if us < LINEAR:
            b = us if us > 0 else 0
        else:
            shift = us.bit_length() - SUB_BITS - 1
            b = SUB + shift * SUB + ((us >> shift) & (SUB - 1))
        counts = self.counts
        counts[b] = counts.get(b, 0) + 1
        self.total += 1

    def merge(self, other: Mapping[int | str, int] | Histogram) -> None:
        """Add another histogram (or its JSON form, whose keys are strings)."""
        counts = other.counts if isinstance(other, Histogram) else other
        for key, n in counts.items():
            b = int(key)
            self.counts[b] = self.counts.get(b, 0) + n
            self.total += n

    def percentile(self, p: float) -> float | None:
        """The ``p``-th percentile (0-100) in milliseconds, or None when empty."""
        if not self.total:
            return None
        rank = max(1, round(self.total * p / 100.0))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                low, high = bounds(b)
                return round((low + high) / 2 / 1000.0, 3)
        return None  # unreachable: total counts every bucket

    def to_json(self) -> dict[str, int]:
        return {str(b): n for b, n in self.counts.items()}

    def summary(self, points: Iterable[float] = (50, 90, 99)) -> dict[str, float | None]:
        out: dict[str, float | None] = {f"p{p:g}": self.percentile(p) for p in points}
        out["count"] = self.total
        return out
