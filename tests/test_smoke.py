"""The smoke run: its verdict arithmetic with no processes, then one short real run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from app.client.histogram import bucket
from app.local.summary import Phase, build_seconds, ledger_check, phase_summary, summarise

ROOT = Path(__file__).resolve().parent.parent
T = 1_795_000_000
KEYS = {"t", "client_sent", "client_answered", "server_shakes", "server_by_result",
        "connections", "envelopes_generated", "envelopes_granted", "group_claimed",
        "amount_generated", "amount_granted", "latency_p50_ms", "latency_p99_ms", "target_qps"}


def fake_run(server_counts: list[int], target: int = 1000):
    """Two hosts sending target/2 each for len(server_counts) seconds from T."""
    seconds = range(T, T + len(server_counts))
    host = {"per_second": [{"second": t, "target": target // 2, "sent": target // 2,
                            "answered": target // 2, "connections": 50,
                            "hist": {str(bucket(40_000)): target // 2}} for t in seconds]}
    server = {"per_second": [{"second": t, "shakes": n, "by_result": {"15": n}}
                             for t, n in zip(seconds, server_counts, strict=True)]}
    polled = {t: {"connections": 100, "ledger": {"generated": {"count": i, "amount": 10 * i},
                                                "granted": {"count": i, "amount": 10 * i}},
                  "group": {"claimed": i}} for i, t in enumerate(seconds)}
    return build_seconds(server, [host, host], polled, T, T + len(server_counts))


def test_records_have_the_documented_keys_and_sum_the_hosts():
    rows = fake_run([1000] * 5)
    assert KEYS <= set(rows[0])
    assert rows[0]["client_sent"] == 1000 and rows[0]["target_qps"] == 1000
    assert rows[3]["envelopes_generated"] == 3 and rows[3]["group_claimed"] == 3
    assert rows[0]["latency_p50_ms"] == pytest.approx(40.0, rel=0.07)


def test_a_phase_passes_only_with_95_percent_of_steady_seconds_within_2_percent():
    # 21 seconds: the first is not steady; one bad second of 20 steady is 95% -> pass
    good = phase_summary(Phase("p", 1000, T, T + 21), fake_run([1000] * 20 + [900]))
    assert good["server_within"] == 0.95 and good["client_within"] == 1.0
    bad = phase_summary(Phase("p", 1000, T, T + 21), fake_run([1000] * 19 + [900, 1021]))
    assert bad["server_within"] == 0.9
    edge = phase_summary(Phase("p", 1000, T, T + 3), fake_run([500, 980, 1020]))
    assert edge["server_within"] == 1.0  # ±2% inclusive; the first second does not count


def test_ledger_check_wants_the_equation_in_count_and_amount():
    ok = {"balanced": True, "generated": {"count": 5, "amount": 50},
          "granted": {"count": 3, "amount": 30}, "waiting": {"count": 1, "amount": 10},
          "expired": {"count": 1, "amount": 10}}
    assert ledger_check(ok)["balanced"]
    assert not ledger_check({**ok, "expired": {"count": 1, "amount": 9}})["balanced"]
    assert not ledger_check({**ok, "balanced": False})["balanced"]
    assert not ledger_check({**ok, "complete": False})["balanced"]


def test_summary_fails_on_a_missed_target():
    config = SimpleNamespace(connections=100, hosts=2, sets=4, qps=1000, pacing="even")
    phases = [Phase("idle", 0, T, T + 2), Phase("60%", 1000, T + 2, T + 10)]
    raw = {"server": {"ledger": {"balanced": True}}, "clients": []}
    passed = summarise(config, phases, fake_run([0, 0] + [1000] * 8), raw, 1.0, 10.0)
    assert passed["passed"]
    missed = summarise(config, phases, fake_run([0, 0] + [1000, 1000] + [900] * 6), raw, 1, 10)
    assert not missed["passed"] and not missed["accuracy_ok"]


@pytest.mark.slow
def test_a_short_smoke_run_passes_and_writes_its_run_directory(tmp_path):
    run_root = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "app.local.smoke", "--connections", "1500", "--hosts", "3",
         "--qps", "1000", "--idle-seconds", "2", "--phase-seconds", "6",
         "--run-dir", str(run_root)],
        cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "verdict: PASS" in proc.stdout
    (run_dir,) = run_root.iterdir()
    rows = [json.loads(line) for line in (run_dir / "seconds.jsonl").read_text().splitlines()]
    assert len(rows) == 2 + 6 + 6 and KEYS <= set(rows[0])
    assert max(r["server_shakes"] for r in rows) == 600
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["passed"] and summary["ledger"]["balanced"]
    assert [p["target"] for p in summary["phases"]] == [0, 300, 600]
    assert list(run_dir.glob("*.png"))
