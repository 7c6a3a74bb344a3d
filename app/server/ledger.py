"""The money of one SET: shake envelopes, group envelopes, campaigns and counters.

Pure state, no I/O but the journal it is given. Every change is made the
same way, live or on replay: build the journal record, append it, apply it
(``_apply``). So a replayed journal rebuilds exactly the state that produced
it, and the invariant holds at every moment, in count and in amount:

    generated = granted + waiting + expired

A group envelope counts as three *shares* (one per recipient); a shake
envelope as one. ``audit()`` recomputes ``waiting`` from the structures
themselves (bucket and open groups), not from running totals, so a test of
it can fail.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from app.server.journal import JournalWriter, encode_record

# Order of the counters in a snapshot ("K") record.
COUNTERS = ("next_seq", "gen_count", "gen_amount", "granted_count", "granted_amount",
            "expired_count", "expired_amount", "groups_created", "claims_granted")
MAX_EID = 0xFFFFFFFF


class LedgerError(Exception):
    """A replayed record contradicts the state (e.g. granting a missing envelope)."""


class IdsExhausted(Exception):
    """No envelope id is left for this SET (u32 ids): a run-time limit, not a bad journal."""


@dataclass
class Campaign:
    """A generation campaign: ``rate`` per second until ``remaining`` reaches 0."""

    rate: int = 0
    remaining: int = 0
    low: int = 0  # group campaigns: recipients' userid range
    high: int = 0


class Group:
    __slots__ = ("eid", "recipients", "shares", "claimed", "expires")

    def __init__(self, eid: int, recipients: tuple[int, ...], shares: tuple[int, ...],
                 expires: int, claimed: list[bool] | None = None) -> None:
        self.eid = eid
        self.recipients = recipients
        self.shares = shares
        self.claimed = claimed or [False] * len(recipients)
        self.expires = expires

    def open_shares(self) -> tuple[int, int]:
        """(count, amount) of shares not yet claimed."""
        n = a = 0
        for share, done in zip(self.shares, self.claimed, strict=True):
            if not done:
                n += 1
                a += share
        return n, a


class Ledger:
    def __init__(self, set_id: int, sets: int, journal: JournalWriter | None = None) -> None:
        self.set_id = set_id
        self.sets = sets
        self.journal = journal
        self.bucket: deque[tuple[int, int]] = deque()
        self.bucket_amount = 0
        self.groups: dict[int, Group] = {}  # open groups, in creation (= expiry) order
        self.group_waiting = [0, 0]  # count, amount of unclaimed, unexpired shares
        self.c = dict.fromkeys(COUNTERS, 0)
        self.yao = Campaign()
        self.fa = Campaign()

    # ------------------------------------------------------------------ live
    def _record(self, kind: bytes, *fields: int) -> None:
        if self.journal is not None:
            self.journal.append(kind, *fields)
        self._apply(kind, fields)

    def next_eid(self) -> int:
        eid = self.c["next_seq"] * self.sets + self.set_id
        if eid > MAX_EID:
            raise IdsExhausted(f"SET {self.set_id}: envelope ids exhausted (next would be {eid} "
                               f"> {MAX_EID}); start with a fresh --journal-dir")
        return eid

    def generate(self, amount: int) -> int:
        """Add one shake envelope of ``amount`` to the bucket."""
        eid = self.next_eid()
        self._record(b"G", eid, amount)
        return eid

    def take(self, userid: int) -> tuple[int, int] | None:
        """Grant the oldest waiting shake envelope to ``userid``; None if empty."""
        if not self.bucket:
            return None
        eid, amount = self.bucket[0]
        self._record(b"S", eid, userid)
        return eid, amount

    def create_group(self, recipients: tuple[int, int, int], shares: tuple[int, int, int],
                     expires: int) -> int:
        eid = self.next_eid()
        self._record(b"P", eid, *recipients, *shares, expires)
        return eid

    def claim(self, eid: int, userid: int) -> int:
        """The share granted to ``userid`` (0: not a recipient, already claimed, gone)."""
        group = self.groups.get(eid)
        if group is None:
            return 0
        try:
            index = group.recipients.index(userid)
        except ValueError:
            return 0
        if group.claimed[index]:
            return 0
        amount = group.shares[index]
        self._record(b"C", eid, userid)
        return amount

    def expire_due(self, now: float) -> list[int]:
        """Expire the unclaimed shares of every group past its deadline."""
        due = []
        for eid, group in self.groups.items():
            if group.expires > now:
                break
            due.append(eid)
        for eid in due:
            self._record(b"X", eid)
        return due

    def set_yao(self, rate: int, remaining: int) -> None:
        self._record(b"Y", rate, remaining)

    def set_fa(self, rate: int, remaining: int, low: int, high: int) -> None:
        self._record(b"F", rate, remaining, low, high)

    # ----------------------------------------------------------------- apply
    def _apply(self, kind: bytes, f: tuple) -> None:
        c = self.c
        if kind == b"S":
            if not self.bucket or self.bucket[0][0] != f[0]:
                raise LedgerError(f"grant of envelope {f[0]} which is not next in the bucket")
            _, amount = self.bucket.popleft()
            self.bucket_amount -= amount
            c["granted_count"] += 1
            c["granted_amount"] += amount
        elif kind == b"G":
            self._check_eid(f[0])
            self.bucket.append((f[0], f[1]))
            self.bucket_amount += f[1]
            c["gen_count"] += 1
            c["gen_amount"] += f[1]
            if self.yao.remaining:
                self.yao.remaining -= 1
        elif kind == b"C":
            group = self.groups.get(f[0])
            if group is None or f[1] not in group.recipients:
                raise LedgerError(f"claim of envelope {f[0]} by {f[1]} who holds no share")
            index = group.recipients.index(f[1])
            if group.claimed[index]:
                raise LedgerError(f"second claim of envelope {f[0]} by {f[1]}")
            group.claimed[index] = True
            amount = group.shares[index]
            c["granted_count"] += 1
            c["granted_amount"] += amount
            c["claims_granted"] += 1
            self.group_waiting[0] -= 1
            self.group_waiting[1] -= amount
            if all(group.claimed):
                del self.groups[f[0]]
        elif kind == b"P":
            self._check_eid(f[0])
            recipients, shares, expires = tuple(f[1:4]), tuple(f[4:7]), f[7]
            self.groups[f[0]] = Group(f[0], recipients, shares, expires)
            c["gen_count"] += len(shares)
            c["gen_amount"] += sum(shares)
            c["groups_created"] += 1
            self.group_waiting[0] += len(shares)
            self.group_waiting[1] += sum(shares)
            if self.fa.remaining:
                self.fa.remaining -= 1
        elif kind == b"X":
            group = self.groups.pop(f[0], None)
            if group is None:
                raise LedgerError(f"expiry of unknown group envelope {f[0]}")
            n, a = group.open_shares()
            c["expired_count"] += n
            c["expired_amount"] += a
            self.group_waiting[0] -= n
            self.group_waiting[1] -= a
        elif kind == b"Y":
            self.yao = Campaign(f[0], f[1])
        elif kind == b"F":
            self.fa = Campaign(f[0], f[1], f[2], f[3])
        elif kind == b"K":
            self.c = dict(zip(COUNTERS, f, strict=True))
        elif kind == b"g":
            self.bucket.append((f[0], f[1]))
            self.bucket_amount += f[1]
        elif kind == b"p":
            claimed = [bool(f[8] & (1 << i)) for i in range(3)]
            group = Group(f[0], tuple(f[1:4]), tuple(f[4:7]), f[7], claimed)
            self.groups[f[0]] = group
            n, a = group.open_shares()
            self.group_waiting[0] += n
            self.group_waiting[1] += a
        elif kind == b"H":
            pass
        else:
            raise LedgerError(f"unknown record {kind!r}")

    def _check_eid(self, eid: int) -> None:
        expected = self.c["next_seq"] * self.sets + self.set_id
        if eid != expected:
            raise LedgerError(f"envelope id {eid} out of sequence (expected {expected})")
        self.c["next_seq"] += 1

    def replay(self, records: list[tuple[bytes, tuple]]) -> None:
        for kind, fields in records:
            self._apply(kind, fields)

    def snapshot_records(self) -> list[bytes]:
        """The records that rebuild this state from nothing (journal compaction)."""
        out = [encode_record(b"K", *(self.c[name] for name in COUNTERS))]
        out += [encode_record(b"g", eid, amount) for eid, amount in self.bucket]
        for g in self.groups.values():
            mask = sum(1 << i for i, done in enumerate(g.claimed) if done)
            out.append(encode_record(b"p", g.eid, *g.recipients, *g.shares, g.expires, mask))
        out.append(encode_record(b"Y", self.yao.rate, self.yao.remaining))
        out.append(encode_record(b"F", self.fa.rate, self.fa.remaining, self.fa.low, self.fa.high))
        return out

    # ---------------------------------------------------------------- report
    def totals(self) -> dict:
        """The ledger from running totals (cheap; used for /stats every second)."""
        c = self.c
        waiting_count = len(self.bucket) + self.group_waiting[0]
        waiting_amount = self.bucket_amount + self.group_waiting[1]
        return _ledger_dict(c, waiting_count, waiting_amount, len(self.bucket),
                            self.bucket_amount, len(self.groups))

    def audit(self) -> dict:
        """The ledger with ``waiting`` recomputed from the structures themselves."""
        waiting_count = len(self.bucket)
        waiting_amount = sum(amount for _, amount in self.bucket)
        bucket = (waiting_count, waiting_amount)
        for group in self.groups.values():
            n, a = group.open_shares()
            waiting_count += n
            waiting_amount += a
        return _ledger_dict(self.c, waiting_count, waiting_amount, *bucket, len(self.groups))


def _ledger_dict(c: dict, waiting_count: int, waiting_amount: int, bucket_count: int,
                 bucket_amount: int, open_groups: int) -> dict:
    generated = {"count": c["gen_count"], "amount": c["gen_amount"]}
    granted = {"count": c["granted_count"], "amount": c["granted_amount"]}
    expired = {"count": c["expired_count"], "amount": c["expired_amount"]}
    waiting = {"count": waiting_count, "amount": waiting_amount}
    return {
        "generated": generated,
        "granted": granted,
        "waiting": waiting,
        "expired": expired,
        "bucket": {"count": bucket_count, "amount": bucket_amount},
        "open_groups": open_groups,
        "groups_created": c["groups_created"],
        "claims_granted": c["claims_granted"],
        "balanced": all(
            generated[k] == granted[k] + waiting[k] + expired[k] for k in ("count", "amount")
        ),
    }


def sum_ledgers(ledgers: list[dict]) -> dict:
    """Add per-SET ledgers; ``balanced`` holds only if it holds for every SET and the sum."""
    total: dict = {}
    for ledger in ledgers:
        for key, value in ledger.items():
            if isinstance(value, dict):
                slot = total.setdefault(key, {"count": 0, "amount": 0})
                slot["count"] += value["count"]
                slot["amount"] += value["amount"]
            elif key != "balanced":
                total[key] = total.get(key, 0) + value
    if not total:
        total = _ledger_dict(dict.fromkeys(COUNTERS, 0), 0, 0, 0, 0, 0)
    total["balanced"] = all(ledger["balanced"] for ledger in ledgers) and all(
        total["generated"][k] == total["granted"][k] + total["waiting"][k] + total["expired"][k]
        for k in ("count", "amount")
    )
    return total
