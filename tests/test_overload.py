"""Overload: thirty times the budget, answered 17 at once, exactly; recovery the next second.

The server runs with ``--shake-budget 100`` over 2 SETs (50 per SET per
second); the real client agent sends 3,000 SHAKEs a second over 1,000
users for a few seconds, then drops to 40. Why exact counts are possible:
the budget is per SET per *arrival* second, and ``/stats`` counts results
by arrival second, so in every second fully inside the overload each SET
answers exactly 50 non-17 (14/15) and 17 to the rest: the merged row says
100 non-17. After the drop, the first whole second has no 17 at all.
Memory: the SETs' RSS before and after is reported (asserted loosely): an
overloaded SET must not queue.
"""

from __future__ import annotations

import time

import psutil

from tests import reliability
from tests.reliability import Row, ledger_diff, record
from tests.test_server import wait_for

reliability_table = reliability.reliability_table  # module fixture: prints the table
start_agent = reliability.start_agent

BUDGET = 100
SETS = 2
OVERLOAD_QPS = 3000
CALM_QPS = 40
OVERLOAD_SECONDS = 5
RSS_BOUND = 30 * 2**20  # bytes a SET may grow by: loose, the figure is reported


def rss(pids: list[int]) -> list[int]:
    return [psutil.Process(pid).memory_info().rss for pid in pids]


def test_far_over_budget_answers_17_exactly_and_recovers_at_once(start_server, start_agent):
    server = start_server(sets=SETS, extra=["--shake-budget", str(BUDGET)])
    server.get("/yaohongbao?qps=30&sum=1000000")  # some 14s among the budgeted answers
    agent = start_agent(server, (1, 1000))
    agent.wait_connected()
    pids = server.set_pids()
    time.sleep(1)
    rss_before = rss(pids)

    over_from = agent.get(f"/qps?qps={OVERLOAD_QPS}")["from"]
    time.sleep(OVERLOAD_SECONDS)
    calm_from = agent.get(f"/qps?qps={CALM_QPS}")["from"]
    time.sleep(3.2)
    rss_after = rss(pids)
    agent.get("/qps?qps=0")
    time.sleep(2.5)

    stats = server.get("/stats?seconds=60")
    arrival = {r["second"]: r for r in stats["per_second_arrival"]}
    by_sent = {r["second"]: r for r in stats["per_second"]}
    full = range(int(over_from) + 1, int(calm_from))  # seconds wholly overloaded
    assert len(full) >= OVERLOAD_SECONDS - 2
    for s in full:
        row = arrival[s]
        answered = row["shakes"] - row["by_result"]["17"]
        assert answered == BUDGET, (s, row)  # 50 per SET, exactly
        assert row["by_result"]["17"] > 10 * BUDGET  # the rest, at once
    calm = [s for s in range(int(calm_from) + 1, int(calm_from) + 3)]
    for s in calm:
        assert by_sent[s]["shakes"] == CALM_QPS and by_sent[s]["by_result"]["17"] == 0, \
            by_sent[s]
        assert arrival[s]["by_result"]["17"] == 0

    # The agent saw the same: every request answered, 17s as the server counted them.
    client = agent.get("/stats?since=1")
    totals = client["totals"]
    assert totals["sent"] == totals["answered"] and totals["lost"] == 0, totals
    server_17 = sum(r["by_result"]["17"] for r in stats["per_second"])
    assert client["results"].get("17", 0) == server_17
    seconds = {r["second"]: r for r in client["per_second"]}
    p99_over = max(seconds[s]["latency_p99_ms"] or 0 for s in full if s in seconds)
    p99_calm = max(seconds[s]["latency_p99_ms"] or 0 for s in calm if s in seconds)
    growth = [a - b for a, b in zip(rss_after, rss_before, strict=True)]
    assert max(growth) < RSS_BOUND, (rss_before, rss_after)
    assert server.get("/health")["restarts"] == 0
    ledger = wait_for(lambda: (lg := server.stats(audit=True)["ledger"])["balanced"] and lg)
    record(Row("overload: 30x budget, then calm", bad_inputs=0,
               survived=f"{client['connections']}/1000",
               lost=totals["sent"] - totals["answered"], ledger_diff=ledger_diff(ledger),
               figures={"budget_per_s": BUDGET, "offered_per_s": OVERLOAD_QPS,
                        "answered_17": server_17,
                        "non17_per_full_second": [arrival[s]["shakes"]
                                                  - arrival[s]["by_result"]["17"] for s in full],
                        "p99_ms_overload": p99_over, "p99_ms_calm": p99_calm,
                        "set_rss_mb_before": [round(x / 2**20, 1) for x in rss_before],
                        "set_rss_mb_after": [round(x / 2**20, 1) for x in rss_after]}))
