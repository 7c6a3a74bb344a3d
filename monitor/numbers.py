"""Numbers for people: money with its unit, rates as integers, latencies to a sensible precision.

One place, so the report page, the comparison page and their tests print a
figure the same way. Every function returns "-" for a figure that is missing.
"""

from __future__ import annotations

CURRENCY = "¥"  # amounts in the ledger are cents of yuan (README, "Envelopes and the ledger")


def money(cents: int | None) -> str:
    """¥76,793.60 from 7679360 cents."""
    if cents is None:
        return "-"
    sign = "-" if cents < 0 else ""
    whole, part = divmod(abs(int(cents)), 100)
    return f"{sign}{CURRENCY}{whole:,}.{part:02d}"


def count(n: float | None) -> str:
    """A count or a rate as an integer with thousands separators."""
    return "-" if n is None else f"{round(n):,}"


def ms(x: float | None) -> str:
    """A latency: three significant figures under 100 ms, whole milliseconds above."""
    if x is None:
        return "-"
    if x >= 100:
        return f"{round(x):,} ms"
    if x >= 10:
        return f"{x:.1f} ms"
    return f"{x:.2f} ms"


def share(x: float | None) -> str:
    """A share of seconds: 95%, 97.5%."""
    if x is None:
        return "-"
    pct = round(100 * x, 1)
    return f"{pct:.0f}%" if pct == int(pct) else f"{pct:.1f}%"


def micros(x: float | None) -> str:
    """CPU per request."""
    return "-" if x is None else f"{x:,.1f} µs"


def size(n: float | None) -> str:
    """Bytes in B, KiB, MiB or GiB with three significant figures."""
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.3g} {unit}" if value < 1000 else f"{round(value):,} {unit}"
    return f"{round(n):,} B"


def seconds(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f} s"
