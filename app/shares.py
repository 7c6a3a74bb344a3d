"""Splitting a whole number over parts so the parts add up to it exactly.

One rule for a fleet's QPS over its hosts and a campaign over the SETs:
part ``k`` of ``total`` over ``parts`` is ``total // parts``, plus one for the
first ``total % parts`` parts.
"""

from __future__ import annotations


def share(total: int, parts: int, index: int) -> int:
    """Part ``index`` of ``total`` split over ``parts``: the remainder goes to the first parts."""
    if parts < 1 or not 0 <= index < parts:
        raise ValueError(f"part {index} outside {parts} parts")
    return total // parts + (1 if index < total % parts else 0)


def campaign_shares(rate: int, total: int, parts: int) -> list[tuple[int, int]]:
    """``(rate, total)`` of each of ``parts`` SETs for a campaign of ``total`` at ``rate``/s.

    The rates split by ``share``; the total splits in proportion to them
    (cumulative rounding), so the parts add up to exactly ``rate`` and
    ``total`` and a SET with no rate holds none of the total — split apart,
    ``qps=2&sum=8`` over 4 SETs left half of the sum with SETs of rate 0,
    which never generated it. With no rate at all the total splits evenly.
    """
    rates = [share(rate, parts, k) for k in range(parts)]
    if rate == 0:
        return [(0, share(total, parts, k)) for k in range(parts)]
    out, before = [], 0
    for r in rates:
        upto = before + r
        out.append((r, total * upto // rate - total * before // rate))
        before = upto
    return out
