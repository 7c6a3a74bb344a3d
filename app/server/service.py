"""What a SET does for its users: shakes under a budget, claims, envelope generation, expiry.

Every change goes through the ledger (which journals it) and every answer
through ``Transport.send`` (which holds it until the SET's commit step has
made the journal write safe). No I/O and no clock here: callers pass the
second.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from app import protocol as p
from app.metrics.statsd import Metrics
from app.server.ledger import Ledger
from app.server.set_stats import SetStats
from app.server.transport import HOT, Conn, Transport
from app.shares import share as budget_share

GEN_TICKS = 10  # envelope generation ticks per second
# Plain ints and module names on the hot path: an enum member or module
# attribute lookup per shake costs more than the ledger's work
# (measured: serve() went from 0.67 to 0.4 us per shake).
GOT, NONE_LEFT, REFUSED, OVERLOAD = (int(c) for c in (
    p.ShakeCode.GOT, p.ShakeCode.NONE_LEFT, p.ShakeCode.REFUSED, p.ShakeCode.OVERLOAD))
ShakeAsked, ShakeRefused, ClaimAsked = p.ShakeAsked, p.ShakeRefused, p.ClaimAsked


def campaign_problem(config: dict, kind: bytes, fields: tuple) -> str:
    """Why ``config`` cannot run the campaign of journal record ``kind`` (Y or F); '' if it can.

    Checked before a campaign is journaled and, at boot, on the campaigns
    the journal replays: a SET never starts generating what would crash it.
    """
    rate, remaining = fields[0], fields[1]
    if not rate or not remaining:
        return ""
    if kind == b"Y":
        lo, hi = config["amount_min"], config["amount_max"]
        if not 1 <= lo <= hi:
            return f"amount_min {lo} and amount_max {hi} are not a range of positive amounts"
        return ""
    low, high = fields[2], fields[3]
    if low > high:
        return f"recipients' userid min {low} > max {high}"
    lo, hi = config["group_amount_min"], config["group_amount_max"]
    if lo > hi:
        return f"group_amount_min {lo} > group_amount_max {hi}"
    return ""


def tick_share(rate: int, index: int) -> int:
    """Envelopes due in tick ``index`` so each second gets exactly ``rate``."""
    return rate * (index + 1) // GEN_TICKS - rate * index // GEN_TICKS


@dataclass(eq=False)
class Service:
    """One SET's work, over its ledger, connections and counters."""

    set_id: int
    sets: int
    config: dict
    ledger: Ledger
    transport: Transport
    stats: SetStats
    metrics: Metrics

    def __post_init__(self) -> None:
        self.rng = random.Random()
        # The server-wide budget split so the SETs' shares sum to it exactly (the
        # settings refuse a budget below the SET count: every share is >= 1).
        self.budget = budget_share(self.config["shake_budget"], self.sets, self.set_id)
        self.budget_second = 0
        self.budget_used = 0

    # --- requests ---------------------------------------------------------
    def serve(self, conn: Conn, events: Sequence[tuple], second: int) -> None:
        """Answer the requests of a logged-in connection (no LoggedIn among ``events``)."""
        if second != self.budget_second:
            self.budget_second, self.budget_used = second, 0
        for event in events:
            kind = type(event)
            if kind is ShakeAsked:
                self.shake(conn, event[0], second)
            elif kind is ShakeRefused:
                self.stats.shake(REFUSED, event.timestamp, second)
                self.transport.send(conn, conn.shake_result(REFUSED, 0, 0, second))
            elif kind is ClaimAsked:
                self.claim(conn, event.envelope_id, second)
            else:  # ClaimRefused
                self.claim(conn, event.envelope_id, second, refused=True)

    def serve_shakes(self, shakers: list[Conn], sents: list[int], second: int) -> None:
        """Answer a batch's lone SHAKEs at once (``app.server.fastpath.read_shakes``).

        The same answers as ``shake`` once per entry, in order: the budget
        admits the first ones, the bucket grants the first admitted, the rest
        of the admitted find none left, the others are over budget.
        """
        if second != self.budget_second:
            self.budget_second, self.budget_used = second, 0
        n = len(shakers)
        allowed = min(n, max(0, self.budget - self.budget_used))
        self.budget_used += n
        granted: list[tuple[int, int]] = []
        take = self.ledger.take
        for conn in shakers[:allowed]:
            got = take(conn.userid)
            if got is None:
                break
            granted.append(got)
            self.metrics.incr("envelopes.granted")
            self.metrics.incr("amount.granted", got[1])
        self.stats.shakes(sents, len(granted), allowed, second)
        transport = self.transport
        HOT.queue_results(shakers, granted, allowed, second, transport.dirty, transport.send)

    def shake(self, conn: Conn, sent: int, second: int) -> None:
        eid = amount = 0
        self.budget_used += 1
        if self.budget_used > self.budget:
            code = OVERLOAD
        else:
            got = self.ledger.take(conn.userid)
            if got is None:
                code = NONE_LEFT
            else:
                code = GOT
                eid, amount = got
                self.metrics.incr("envelopes.granted")
                self.metrics.incr("amount.granted", amount)
        self.stats.shake(code, sent, second)
        self.transport.send(conn, conn.shake_result(code, eid, amount, second))

    def claim(self, conn: Conn, envelope_id: int, second: int, refused: bool = False) -> None:
        amount = 0 if refused else self.ledger.claim(envelope_id, conn.userid)
        if amount:
            self.stats.count("claims.granted")
            self.metrics.incr("claims.granted")
            self.metrics.incr("envelopes.granted")  # a share, as generated counts them
            self.metrics.incr("amount.granted", amount)
        else:
            self.stats.count("claims.refused")
            self.metrics.incr("claims.refused")
        self.transport.send(conn, conn.claim_result(envelope_id, amount, second))

    # --- envelopes --------------------------------------------------------
    def generate(self, index: int, now: float) -> None:
        """Tick ``index`` (of ``GEN_TICKS`` a second): shake envelopes and group envelopes."""
        self._generate_shake(index)
        self._generate_groups(index, now)

    def _generate_shake(self, index: int) -> None:
        yao = self.ledger.yao
        n = min(tick_share(yao.rate, index), yao.remaining)
        lo, hi = self.config["amount_min"], self.config["amount_max"]
        for _ in range(n):
            amount = self.rng.randint(lo, hi)
            self.ledger.generate(amount)
            self.metrics.incr("envelopes.generated")
            self.metrics.incr("amount.generated", amount)

    def _generate_groups(self, index: int, now: float) -> None:
        fa = self.ledger.fa
        n = min(tick_share(fa.rate, index), fa.remaining)
        if not n:
            return
        lo, hi = self.config["group_amount_min"], self.config["group_amount_max"]
        second = int(now)
        expires = int(now + self.config["claim_ttl"])
        for _ in range(n):
            recipients = self._pick_recipients(fa.low, fa.high)
            if recipients is None:
                self.stats.count("group.no_recipients")
                return
            total = self.rng.randint(max(lo, 3), max(hi, 3))
            a, b = sorted(self.rng.sample(range(1, total), 2))
            shares = (a, b - a, total - b)
            eid = self.ledger.create_group(recipients, shares, expires)
            self.metrics.incr("group.created")
            self.metrics.incr("envelopes.generated", 3)
            self.metrics.incr("amount.generated", total)
            users = self.transport.users
            for userid, share in zip(recipients, shares, strict=True):
                conn = users.get(userid)
                if conn is not None:
                    self.transport.send(conn, conn.push(eid, share, recipients, second))
                    self.stats.count("group.pushed")
                    self.metrics.incr("group.pushed")

    def _pick_recipients(self, low: int, high: int) -> tuple[int, int, int] | None:
        """Three distinct online users of this SET with userid in [low, high]."""
        first = low + (self.set_id - low) % self.sets
        if first > high:
            return None
        slots = (high - first) // self.sets + 1
        if slots < 3:
            return None
        chosen: list[int] = []
        users = self.transport.users
        for _ in range(64):
            userid = first + self.rng.randrange(slots) * self.sets
            if userid not in chosen and userid in users:
                chosen.append(userid)
                if len(chosen) == 3:
                    return chosen[0], chosen[1], chosen[2]
        return None

    def expire(self, now: float) -> None:
        """Unclaimed group shares past their time go back to nobody (counted as expired)."""
        counters = self.ledger.c
        shares, amount = counters["expired_count"], counters["expired_amount"]
        expired = self.ledger.expire_due(now)
        if expired:  # in shares, like envelopes.generated counts a group as 3
            self.stats.count("group.expired", len(expired))
            self.metrics.incr("envelopes.expired", counters["expired_count"] - shares)
            self.metrics.incr("amount.expired", counters["expired_amount"] - amount)
