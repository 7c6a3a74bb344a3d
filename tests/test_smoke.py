"""The smoke run: its verdict arithmetic with no processes, then short real runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from app.client.histogram import bucket
from app.local.summary import (
    Phase,
    build_seconds,
    ledger_check,
    phase_summary,
    stall_share,
    summarise,
    verdict,
)

ROOT = Path(__file__).resolve().parent.parent
T = 1_795_000_000
KEYS = {"t", "target_qps", "server_served", "client_served", "server_arrived",
        "server_by_result", "client_answered", "client_sent", "client_sent_late",
        "server_scheduled", "client_skipped", "connections", "client_connections",
        "loop_lag_ms", "client_lag_ms", "client_stalls", "client_stall_ms",
        "client_stall_cpu_ms", "gc_pause_ms", "gc_cpu_ms", "net", "server_cpu_seconds",
        "client_cpu_seconds", "server_rss_bytes", "client_rss_bytes", "envelopes_generated",
        "envelopes_granted", "group_claimed", "amount_generated", "amount_granted",
        "latency_p50_ms", "latency_p99_ms"}


def fake_run(served: list[int], target: int = 1000, latency_us: int = 40_000,
             scheduled: list[int] | None = None, sent_late: list[int] | None = None):
    """Two hosts asked for target/2 each for len(served) seconds from T.

    ``served``: what the server answered (with 15) in each second by arrival, and
    the clients got answered in it (each host also 3 overload answers, 17, which
    serve nothing); ``scheduled``: what the server counted by the
    frames' stamp (default: all the clients sent); ``sent_late``: what each host sent
    only after its second had ended (default: none).
    """
    seconds = range(T, T + len(served))
    late = sent_late or [0] * len(served)
    scheduled = scheduled if scheduled is not None else [target] * len(served)
    hosts = [{"per_second": [
        {"second": t, "target": target // 2, "sent": target // 2, "answered": n // 2 + 3,
         "served": n // 2, "results": {"15": n // 2, "17": 3}, "connections": 50,
         "lag_ms": 10.0 * (h + 1) + i,
         # every other second each host's pacers stalled once: 200 ms behind, 5 ms of CPU a host
         "stalls": i % 2, "stall_ms": 200.0 * (i % 2), "stall_cpu_ms": 5.0 * (h + 1) * (i % 2),
         "sent_late": late[i],
         "hist": {str(bucket(latency_us)): target // 2}}
        for i, (t, n) in enumerate(zip(seconds, served, strict=True))]} for h in range(2)]
    server = {
        "per_second": [{"second": t, "shakes": n, "by_result": {"15": n}}
                       for t, n in zip(seconds, scheduled, strict=True)],
        "per_second_arrival": [{"second": t, "shakes": n + 7, "by_result": {"15": n, "17": 7}}
                               for t, n in zip(seconds, served, strict=True)],
        "health_per_second": [{"second": t, "loop_lag_ms": 1.5 + i, "gc_pause_ms": 0.25 * i,
                               "gc_cpu_ms": 0.125 * i}
                              for i, t in enumerate(seconds)],
    }
    polled = {t: {"connections": 100, "time": t + 0.3 + 0.01 * i,
                  "net": {"box": {"packets_in": 1000 * i, "packets_out": 1000 * i,
                                  "bytes_in": 80_000 * i, "bytes_out": 80_000 * i}},
                  "server_cpu_seconds": 0.01 * i, "client_cpu_seconds": 0.02 * i,
                  "server_rss_bytes": 2_000_000, "client_rss_bytes": 5_000_000,
                  "ledger": {"generated": {"count": i, "amount": 10 * i},
                             "granted": {"count": i, "amount": 10 * i}},
                  "group": {"claimed": i}} for i, t in enumerate(seconds)}
    return build_seconds(server, hosts, polled, T, T + len(served))


def test_records_count_what_was_served_and_what_was_scheduled_apart():
    rows = fake_run([1000, 700, 1300], scheduled=[1000, 1000, 990])
    assert KEYS == set(rows[0]) - {"_hist"}
    assert [r["server_served"] for r in rows] == [1000, 700, 1300]  # 17s are not served
    assert [r["server_arrived"] for r in rows] == [1007, 707, 1307]
    assert [r["client_served"] for r in rows] == [1000, 700, 1300]  # nor at the clients
    assert [r["client_answered"] for r in rows] == [1006, 706, 1306]
    assert [r["server_scheduled"] for r in rows] == [1000, 1000, 990]
    assert rows[0]["client_sent"] == 1000 and rows[0]["target_qps"] == 1000
    assert [r["loop_lag_ms"] for r in rows] == [1.5, 2.5, 3.5]
    assert [r["client_lag_ms"] for r in rows] == [20.0, 21.0, 22.0]  # the latest host's
    assert [r["gc_pause_ms"] for r in rows] == [0.0, 0.25, 0.5]
    assert [r["gc_cpu_ms"] for r in rows] == [0.0, 0.125, 0.25]
    # counters 1000 packets apart over 1.01 s; the last second has no next snapshot
    assert rows[0]["net"] == {"box": {"packets_in": 990.1, "packets_out": 990.1,
                                      "bytes_in": 79207.9, "bytes_out": 79207.9}}
    assert rows[2]["net"] == {}
    # a missed snapshot: the rate over the longer interval, not a gap
    hosts = [{"per_second": [{"second": T + i, "target": 0, "sent": 0, "answered": 0,
                              "connections": 1} for i in range(3)]}]
    polled = {T + i: {"time": T + i + 0.3, "net": {"box": {"packets_in": 1000 * i}}}
              for i in (0, 2)}
    gap = build_seconds({}, hosts, polled, T, T + 3)
    assert [r["net"] for r in gap] == [{"box": {"packets_in": 1000.0}}] * 2 + [{}]
    assert rows[1]["envelopes_generated"] == 1 and rows[2]["group_claimed"] == 2
    assert rows[0]["latency_p50_ms"] == pytest.approx(40.0, rel=0.07)


def test_a_phase_passes_only_with_95_percent_of_steady_seconds_served_within_2_percent():
    # 21 seconds: the first is not steady; one bad second of 20 steady is 95% -> pass
    good = phase_summary(Phase("p", 1000, T, T + 21), fake_run([1000] * 20 + [980]))
    assert good["server_within"] == good["client_within"] == 1.0 and good["passed"]
    edge = phase_summary(Phase("p", 1000, T, T + 21), fake_run([1000] * 20 + [900]))
    assert edge["server_within"] == 0.95 and edge["passed"] and edge["reasons"] == []
    bad = phase_summary(Phase("p", 1000, T, T + 21), fake_run([1000] * 19 + [900, 1022]))
    assert bad["server_within"] == bad["client_within"] == 0.9 and not bad["passed"]
    assert bad["reasons"] == [
        "p: the server served 1,000/s ±2% in 18 of 20 steady seconds (90.0%; needs 95%; "
        "mean 996/s, -0.4%)",
        "p: the clients got answered 1,000/s ±2% in 18 of 20 steady seconds (90.0%; needs 95%; "
        "mean 996/s, -0.4%)"]
    # the same seconds when the clients sent some requests only after their second
    blamed = phase_summary(Phase("p", 1000, T, T + 21),
                           fake_run([1000] * 19 + [900, 1022], sent_late=[0] * 19 + [50, 0]))
    assert blamed["sent_late"] == 100  # 50 from each of the two hosts
    assert blamed["reasons"][0] == (
        "p: the server served 1,000/s ±2% in 18 of 20 steady seconds (90.0%; needs 95%; "
        "mean 996/s, -0.4%; the clients sent 100 of them only after their second had ended)")
    # 37 of 39 is 94.9%, short of 95%: the reason says so, not a rounded "95%"
    short = phase_summary(Phase("p", 1000, T, T + 40), fake_run([1000] * 38 + [900, 1022]))
    assert not short["passed"]
    assert "in 37 of 39 steady seconds (94.9%; needs 95%;" in short["reasons"][0]
    first = phase_summary(Phase("p", 1000, T, T + 3), fake_run([500, 980, 1020]))
    assert first["server_within"] == 1.0  # ±2% inclusive; the first second does not count


def test_a_backlog_fails_by_arrival_although_every_second_was_scheduled_exactly():
    # The server falls behind and catches up: by send stamp every second is exact.
    late = phase_summary(Phase("60%", 1000, T, T + 9),
                         fake_run([1000, 1000, 400, 400, 2200, 1000, 1000, 600, 1400]))
    assert late["scheduled_within"] == 1.0
    assert late["scheduled_counted"] == late["scheduled_sent"] == 9000
    assert late["server_within"] == 3 / 8 and late["server_qps"] == 1000.0
    assert late["reasons"][0].startswith(
        "60%: the server served 1,000/s ±2% in 3 of 8 steady seconds (37.5%;")


def test_p99_over_100_ms_fails_a_phase_served_on_time():
    slow = phase_summary(Phase("30%", 1000, T, T + 5), fake_run([1000] * 5, latency_us=150_000))
    assert slow["server_within"] == 1.0 and not slow["passed"]
    (reason,) = slow["reasons"]
    assert reason.startswith("30%: p99 latency 1") and reason.endswith("ms (needs < 100 ms)")
    assert slow["latency_p99_ms"] == pytest.approx(150.0, rel=0.07)


def test_the_scheduled_check_wants_every_request_sent_counted():
    lost = phase_summary(Phase("p", 1000, T, T + 5), fake_run([1000] * 5,
                                                              scheduled=[1000] * 4 + [997]))
    assert lost["server_within"] == 1.0
    assert lost["reasons"] == ["p: scheduled check: the server counted 4,997 of the 5,000 "
                               "requests sent in the phase"]


def test_phase_resources_come_from_the_records():
    row = phase_summary(Phase("p", 1000, T, T + 5), fake_run([1000] * 5))
    # steady seconds T+1..T+4: 0.03 s of server CPU for the 3,000 answers of T+1..T+3
    assert row["server_cpu_us_per_request"] == 10.0
    assert row["server_bytes_per_connection"] == 20_000
    assert row["client_bytes_per_connection"] == 50_000
    assert (row["loop_lag_max_ms"], row["gc_pause_max_ms"]) == (5.5, 1.0)
    assert row["client_lag_max_ms"] == 24.0  # host 1's lag in the phase's last second


def test_client_pacer_stalls_are_summed_over_hosts_and_steady_seconds():
    rows = fake_run([1000] * 5)
    assert [r["client_stalls"] for r in rows] == [0, 2, 0, 2, 0]  # both hosts, odd seconds
    assert [r["client_stall_cpu_ms"] for r in rows] == [0.0, 15.0, 0.0, 15.0, 0.0]
    row = phase_summary(Phase("p", 1000, T, T + 5), rows)  # steady: T+1..T+4
    assert (row["client_stalls"], row["client_stall_ms"], row["client_stall_cpu_ms"]) == (
        4, 800.0, 30.0)
    assert stall_share(row) == "4 (0.8 s behind in all, their own CPU 4% of it)"
    assert stall_share({"client_stalls": 0, "client_stall_ms": 0.0}) == "0"


def test_ledger_check_wants_the_equation_in_count_and_amount():
    ok = {"balanced": True, "generated": {"count": 5, "amount": 50},
          "granted": {"count": 3, "amount": 30}, "waiting": {"count": 1, "amount": 10},
          "expired": {"count": 1, "amount": 10}}
    assert ledger_check(ok)["balanced"]
    assert not ledger_check({**ok, "expired": {"count": 1, "amount": 9}})["balanced"]
    assert not ledger_check({**ok, "balanced": False})["balanced"]
    assert not ledger_check({**ok, "complete": False})["balanced"]
    assert verdict([], {"balanced": False})["reasons"][0].startswith("ledger: ")


def test_summary_fails_on_a_missed_target_and_says_why():
    config = SimpleNamespace(connections=100, hosts=2, sets=4, qps=1000, pacing="even")
    phases = [Phase("idle", 0, T, T + 2), Phase("60%", 1000, T + 2, T + 10)]
    raw = {"server": {"ledger": {"balanced": True}}, "clients": []}
    passed = summarise(config, phases, fake_run([0, 0] + [1000] * 8), raw, 1.0, 10.0)
    assert passed["passed"] and passed["reasons"] == []
    missed = summarise(config, phases, fake_run([0, 0] + [1000, 1000] + [900] * 6), raw, 1, 10)
    assert not missed["passed"]
    assert [r.split(" in ")[1][:31] for r in missed["reasons"]] == [
        "1 of 7 steady seconds (14.3%; n"] * 2


def smoke(run_root: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    proc = subprocess.run(
        [sys.executable, "-m", "app.local.smoke", "--connections", "1500", "--hosts", "3",
         "--qps", "1000", "--idle-seconds", "2", "--phase-seconds", "6",
         "--run-dir", str(run_root), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    (run_dir,) = run_root.iterdir()
    return proc, run_dir


@pytest.mark.slow
def test_a_short_smoke_run_passes_and_writes_its_run_directory(tmp_path):
    proc, run_dir = smoke(tmp_path / "runs")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "verdict: PASS" in proc.stdout
    rows = [json.loads(line) for line in (run_dir / "seconds.jsonl").read_text().splitlines()]
    assert len(rows) == 2 + 6 + 6 and KEYS == set(rows[0])
    assert max(r["server_scheduled"] for r in rows) == 600
    # every graph from the run itself: the machine's figures are in the records
    assert all(r["loop_lag_ms"] is not None and r["gc_pause_ms"] is not None for r in rows)
    assert all(len(r["net"]) == 1 for r in rows[:-1])  # one machine; the last has no next
    assert all(r["client_connections"] == r["connections"] == 1500 for r in rows)
    for side in ("server", "client"):
        cpu = [r[f"{side}_cpu_seconds"] for r in rows]
        assert all(later >= earlier > 0 for earlier, later in zip(cpu, cpu[1:], strict=False))
        assert all(r[f"{side}_rss_bytes"] > 10 * 2**20 for r in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["passed"] and summary["ledger"]["balanced"] and summary["reasons"] == []
    assert [p["target"] for p in summary["phases"]] == [0, 300, 600]
    for phase in summary["phases"][1:]:
        assert phase["scheduled_counted"] == phase["scheduled_sent"] == 6 * phase["target"]
    assert (run_dir / "index.html").exists() and list(run_dir.glob("*.png"))


@pytest.mark.slow
def test_a_server_slower_than_the_asked_rate_fails_the_smoke_run(tmp_path):
    # 400 SHAKEs a second before 17 overload: the 30% phase (300/s) fits, 60% does not
    proc, run_dir = smoke(tmp_path / "runs", "--shake-budget", "400")
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    thirty, sixty = summary["phases"][1:]
    assert thirty["passed"] and not sixty["passed"]
    assert sixty["server_qps"] == sixty["client_qps"] == 400.0
    assert sixty["server_within"] == sixty["client_within"] == 0.0
    assert summary["reasons"] == [
        "60%: the server served 600/s ±2% in 0 of 5 steady seconds (0.0%; needs 95%; "
        "mean 400/s, -33.3%)",
        "60%: the clients got answered 600/s ±2% in 0 of 5 steady seconds (0.0%; needs 95%; "
        "mean 400/s, -33.3%)"]
    assert "verdict: FAIL" in proc.stdout and summary["reasons"][0] in proc.stdout
