"""Bad settings stop the server at start; campaigns keep their sums over any SET count.

Issue 11, items 2 and 3: a bad setting named at start (exit 2) instead of a
crash loop under load, and ``/yaohongbao?qps=2&sum=8`` over 4 SETs generating
8 envelopes, not 4.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app.local.runner import ROOT
from tests.test_server import wait_for


@pytest.mark.parametrize("flags,words", [
    (["--amount-min", "500", "--amount-max", "1"], ["amount_min = '500'", "amount_max = '1'"]),
    (["--sets", "4", "--shake-budget", "2"], ["shake_budget = '2'", "below the SET count 4"]),
    (["--statsd", "localhost"], ["statsd", "expected HOST:PORT", "'localhost'"]),
    (["--group-amount-min", "1"], ["group_amount_min = '1'", ">= 3"]),
])
def test_a_bad_setting_stops_the_server_at_start_naming_it(tmp_path, flags, words):
    done = subprocess.run([sys.executable, "-m", "app.server", "--port", "0", "--control",
                           "127.0.0.1:0", "--journal-dir", str(tmp_path / "j"), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    for word in words:
        assert word in done.stderr
    assert not (tmp_path / "j").exists()  # nothing started, nothing journaled


def test_an_auto_sets_budget_below_the_set_count_stops_the_server(tmp_path):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("auto gives one SET on one core: a budget of 1 is enough")
    done = subprocess.run([sys.executable, "-m", "app.server", "--port", "0", "--control",
                           "127.0.0.1:0", "--sets", "auto", "--target-connections", "1",
                           "--shake-budget", "1", "--journal-dir", str(tmp_path / "j")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"below the SET count {os.cpu_count()}" in done.stderr


def test_a_campaign_over_4_sets_generates_its_whole_sum(start_server):
    server = start_server(sets=4)
    answer = server.get("/yaohongbao?qps=2&sum=8")
    assert answer["ok"] and answer["rate"] == 2 and answer["sum"] == 8
    ledger = wait_for(lambda: (lg := server.stats()["ledger"])["generated"]["count"] == 8 and lg,
                      timeout=10)
    campaigns = [s["campaigns"]["yao"] for s in server.stats()["per_set"]]
    assert sum(c["rate"] for c in campaigns) == 2
    assert sum(c["remaining"] for c in campaigns) == 0
    assert ledger["generated"]["count"] == 8
