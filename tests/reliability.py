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

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app.local.runner import CLIENT_READY, ROOT, Service, client_command, get_json

TABLE_PATH = ROOT / "var" / "reliability-table.txt"


@dataclass
class Row:
    scenario: str
    faults: int = 0  # faults injected (kills, restarts, corruptions, dead daemons)
    bad_inputs: int = 0  # hostile connections/frames/requests tried
    survived: str = ""  # connections that survived, e.g. "200/200"
    # None: not measured by the scenario (shown as "-"), never a figure put in by hand
    lost: int | None = None  # requests of well-behaved clients left unanswered
    ledger_diff: int | None = None  # |generated - granted - waiting - expired| (count + amount)
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
    body = [(r.scenario, str(r.faults), str(r.bad_inputs), r.survived or "-",
             "-" if r.lost is None else str(r.lost),
             "-" if r.ledger_diff is None else str(r.ledger_diff)) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [line(head), line(tuple("-" * w for w in widths))]
    out += [line(b) for b in body]
    total = (f"TOTAL: faults {sum(r.faults for r in rows)}, bad inputs "
             f"{sum(r.bad_inputs for r in rows)}, lost {sum(r.lost or 0 for r in rows)}, "
             f"ledger diff {sum(r.ledger_diff or 0 for r in rows)}")
    out += [line(tuple("-" * w for w in widths)), total,
            "lost: requests of well-behaved clients never answered, outside a fault's own "
            "in-flight requests (those are in the figures as in_flight_lost)",
            "ledger diff: |generated - granted - waiting - expired|, count + amount",
            "-: the scenario does not measure it (no load of well-behaved clients, no ledger)",
            "",
            "figures:"]
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
def reliability_table() -> Iterator[None]:
    """Module teardown: print the table so far and rewrite var/reliability-table.txt."""
    yield
    if ROWS:
        print("\n" + write_table())


class AgentProcess:
    """The real client agent (``python -m app.client``) as a runner ``Service``.

    Stopped by PID: SIGTERM to the agent, then SIGKILL of its group (its
    workers) — also from the fixture's finalizer when a test fails.
    """

    def __init__(self, log_path: Path, server_port: int, users: tuple[int, int],
                 qps: int = 0, source: str = "127.1.0.1", **flags: object) -> None:
        cmd = client_command(server_port, users, source.split(","), qps=qps,
                             **{"host_name": "reliability", **flags})
        self.service = Service("agent", cmd, log_path, CLIENT_READY)
        self.log_path = log_path
        self.users = users[1] - users[0] + 1
        self.api = ""

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.service.proc

    def start(self, timeout: float = 30.0) -> AgentProcess:
        match = self.service.start(timeout)
        self.api = f"{match.group(1)}:{match.group(2)}"
        return self

    def get(self, path: str, timeout: float = 10.0) -> dict:
        return get_json(self.api, path, timeout)

    def wait_connected(self, n: int | None = None, timeout: float = 30.0) -> float:
        """Seconds until ``n`` (default: every user) connections are logged in."""
        want = self.users if n is None else n
        started = time.time()
        while time.time() - started < timeout:
            if self.get("/health")["connections"] >= want:
                return time.time() - started
            time.sleep(0.05)
        raise AssertionError(f"agent: {self.get('/health')} after {timeout}s, wanted {want}")

    def signal_group(self, signum: int) -> None:
        os.killpg(self.service.pid, signum)

    def stop(self) -> None:
        self.service.stop(10.0)  # SIGKILL of the group: workers left behind


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Factory: ``start_agent(server, (first, last), qps=0, **flags)`` -> a running agent."""
    started: list[AgentProcess] = []

    def start(server: Any, users: tuple[int, int], qps: int = 0,
              **flags: object) -> AgentProcess:
        agent = AgentProcess(tmp_path / f"agent-{time.time_ns()}.log", server.port, users,
                             qps, **flags)
        started.append(agent)
        return agent.start()

    yield start
    for agent in started:
        agent.stop()
