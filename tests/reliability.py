"""The reliability table: one row per fault/hostile/overload scenario of issue 7.

Why a module-level registry: the rows come from several test modules
(test_reliability, test_hostile, test_overload, test_journal, test_auth)
that run in one pytest process. Each module tears down through the
``reliability_table`` fixture, which prints the table so far (visible with
``-s``) and rewrites ``var/reliability-table.txt``, so after a full run the
file holds every row. Figures are reported, not asserted (beyond the
generous bounds in the tests themselves).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TABLE_PATH = ROOT / "var" / "reliability-table.txt"


@dataclass
class Row:
    scenario: str
    faults: int = 0  # faults injected (kills, restarts, corruptions, dead daemons)
    bad_inputs: int = 0  # hostile connections/frames/requests tried
    survived: str = ""  # connections that survived, e.g. "200/200"
    lost: int = 0  # requests of well-behaved clients left unanswered
    ledger_diff: int = 0  # |generated - granted - waiting - expired| (count + amount)
    figures: dict[str, object] = field(default_factory=dict)


ROWS: list[Row] = []


def record(row: Row) -> Row:
    """Add a row (a test calls it once its assertions about the scenario passed)."""
    ROWS.append(row)
    return row


def ledger_diff(ledger: dict) -> int:
    """How far the ledger is from balancing, in count plus amount (0 when exact)."""
    return sum(abs(ledger["generated"][k] - ledger["granted"][k] - ledger["waiting"][k]
                   - ledger["expired"][k]) for k in ("count", "amount"))


def render(rows: list[Row]) -> str:
    head = ("scenario", "faults", "bad inputs", "survived", "lost", "ledger diff")
    body = [(r.scenario, str(r.faults), str(r.bad_inputs), r.survived or "-", str(r.lost),
             str(r.ledger_diff)) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [line(head), line(tuple("-" * w for w in widths))]
    out += [line(b) for b in body]
    total = (f"TOTAL: faults {sum(r.faults for r in rows)}, bad inputs "
             f"{sum(r.bad_inputs for r in rows)}, lost {sum(r.lost for r in rows)}, "
             f"ledger diff {sum(r.ledger_diff for r in rows)}")
    out += [line(tuple("-" * w for w in widths)), total, "", "figures:"]
    for r in rows:
        if r.figures:
            figures = ", ".join(f"{k}={v}" for k, v in r.figures.items())
            out.append(f"  {r.scenario}: {figures}")
    return "\n".join(out) + "\n"


def write_table() -> str:
    text = f"reliability table ({time.strftime('%Y-%m-%d %H:%M:%S')})\n" + render(ROWS)
    TABLE_PATH.parent.mkdir(parents=True, exist_ok=True)
    TABLE_PATH.write_text(text)
    return text


@pytest.fixture(scope="module", autouse=True)
def reliability_table():
    """Module teardown: print the table so far and rewrite var/reliability-table.txt."""
    yield
    if ROWS:
        print("\n" + write_table())
