"""The scale bench's floor: the C programs compile and serve exactly; the bench sets it beside ours.

A real run of ``app/bench/floor.c`` at a size any machine affords (3,000
connections, 3 hosts, 1,500 shakes a second for 4 s): every steady second
is counted exactly at both ends, so the share within ±2% is 1.0 — no timing
is asserted. The helpers that lay out the floor's processes and set its
figures beside hongbao's are checked with exact numbers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from app.bench import floor, scale
from app.client.agent import PER_PROCESS
from app.local.runner import ROOT
from app.local.summary import loop_lag_seconds


def test_client_layout_splits_hosts_like_the_agent():
    layout = floor.client_layout(1_000_000, 17)
    assert sum(n for _, n in layout) == 1_000_000
    assert len(layout) == 17 * 3  # 58,823 users a host, 19,700 a process at most
    assert max(n for _, n in layout) <= PER_PROCESS
    firsts = [f for f, _ in layout]
    assert firsts == sorted(firsts) and firsts[0] == 1
    # contiguous: each process starts where the previous one ended
    assert all(f + n == g for (f, n), (g, _) in zip(layout, layout[1:], strict=False))


def test_within_share_counts_seconds_inside_two_percent():
    counts = {10: 1000, 11: 1020, 12: 1021, 13: 980, 14: 0}
    assert floor.within_share(counts, range(10, 15), 1000) == 3 / 5


def test_attach_floor_gives_each_phase_the_floor_and_the_ratio():
    result = {"phases": [{"target": 30000, "server_cpu_us_per_request": 15.0,
                          "client_cpu_us_per_request": 15.0},
                         {"target": 60000, "server_cpu_us_per_request": 12.0,
                          "client_cpu_us_per_request": None}],
              "floor": {"kind": "C", "group": {"pushed": 3000, "claims": 3000,
                                                "claims_served": 3000, "claimed": 2999},
                        "phases": [
                  {"target": 30000, "server_cpu_us_per_request": 11.0,
                   "client_cpu_us_per_request": 9.0, "loop_lag_max_ms": 37.46,
                   **loop_lag_seconds([37.46, 4.0, 9.9, 10.0, 2.5])},
                  {"target": 60000, "server_cpu_us_per_request": 10.0,
                   "client_cpu_us_per_request": 8.0}]}}
    scale.attach_floor(result)
    first, second = result["phases"]
    assert first["floor_ratio"] == 1.5
    assert first["floor_server_cpu_us_per_request"] == 11.0
    assert "floor_ratio" not in second  # hongbao's client side was not measured
    table = "\n".join(scale.floor_lines(result))
    assert "1.50x" in table
    # the floor carried the group traffic too, and says how much
    assert table.splitlines()[1].endswith("C; group envelopes pushed 3,000, claims sent 3,000, "
                                          "served 3,000, answered 2,999")
    row_30k, row_60k, lags = table.splitlines()[-3:]
    assert row_30k.split()[-2:] == ["37.5", "1.50x"]  # the C server's loop lag, then the ratio
    assert row_60k.split()[-2:] == ["-", "-"]
    # each second by its worst tick: 4.0, 9.9 and 2.5 ms are under 10 ms, 10.0 is not
    assert lags.endswith("30000 3 of 5 s under 10 ms (median 9.9 ms), 60000 -"), lags


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")
def test_floor_serves_every_second_exactly(tmp_path):
    # with the bench's quiet end (the last two of 20 ticks send nothing): still exact
    # and the bench's group traffic: 30 envelopes a second pushed, each to three users
    result = floor.measure(tmp_path, connections=3000, hosts=3, phases=[1500], seconds=4,
                           ticks=20, connect_timeout=60, quiet_ms=100, groups_per_s=30)
    assert result["kind"].startswith("C epoll floor")
    assert result["processes"] == {"servers": 1, "clients": 3}
    (phase,) = result["phases"]
    assert phase["target"] == 1500
    assert phase["server_arrival_within"] == 1.0
    assert phase["client_answered_within"] == 1.0
    assert phase["server_cpu_us_per_request"] > 0 and phase["client_cpu_us_per_request"] > 0
    # the C server's 10 timer ticks a second woke it in every second, each a little late
    assert 0 < phase["loop_lag_max_ms"] < 1000
    # and each of the phase's seconds counted against the 10 ms target
    assert phase["loop_lag_seconds"] >= 4
    assert 0 <= phase["loop_lag_under_target"] <= phase["loop_lag_seconds"]
    seconds = [line.split() for line in (tmp_path / "server0.txt").read_text().splitlines()]
    assert all(len(fields) == 5 and int(fields[2]) > 0 for fields in seconds)
    # every request sent in a steady second was answered: the clients' own records
    sent = answered = 0
    for path in tmp_path.glob("client*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            sent += record["sent"]
            answered += record["answered"]
    assert sent == answered == 1500 * 4
    # every push claimed, every claim served and answered: the counts of three programs
    group = result["group"]
    assert group["pushed"] > 0 and group["pushed"] % 3 == 0  # three recipients each
    assert group["pushed"] == group["claims"] == group["claims_served"] == group["claimed"], group


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")
def test_hongbao_server_under_the_floors_c_clients_answers_every_request(tmp_path):
    """``--clients floor``: hongbao's real server, loaded by the C clients only."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "app.bench", "scale", "--connections", "3000", "--hosts", "3",
           "--phases", "1500", "--hold", "0", "--phase-seconds", "4", "--floor", "no",
           "--clients", "floor", "--netns", "no", "--run-dir", str(run_dir)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    result = json.loads((run_dir / "result.json").read_text())
    assert done.returncode == (0 if result["passed"] else scale.EXIT_VERDICT_FAILED), \
        done.stderr[-2000:]
    cc = result["c_clients"]
    assert cc["processes"] == {"servers": 0, "clients": 3}
    (phase,) = cc["phases"]
    assert phase["target"] == 1500 and phase["server_cpu_us_per_request"] > 0
    sent = answered = 0
    for path in (run_dir / "c-clients").glob("client*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            sent += record["sent"]
            answered += record["answered"]
    assert sent == answered == 1500 * 4  # hongbao's SETs answered every one
    assert result["ledger"]["balanced"] is True
    assert "under the floor's C clients" in done.stdout
