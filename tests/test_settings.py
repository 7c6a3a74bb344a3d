"""The settings table: one meaning per environment name, cross-field checks, the SETs' copy.

Pure: no processes, no sockets (part of ``make check``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app import settings
from app.settings import SETTINGS, SettingError, from_json, resolve, to_json
from app.shares import campaign_shares, share


def test_every_environment_name_means_one_thing():
    counts = Counter(s.env for s in SETTINGS)
    assert [env for env, n in counts.items() if n > 1] == []
    assert {s.env for s in SETTINGS if s.name == "qps"} == {
        "HONGBAO_QPS", "HONGBAO_SMOKE_QPS", "HONGBAO_BENCH_SERVER_QPS", "HONGBAO_BENCH_CLIENT_QPS"}


def test_no_setting_hides_behind_a_config_attribute():
    reserved = set(dataclasses.fields(settings.Config)) | set(vars(settings.Config))
    assert {s.name for s in SETTINGS} & {getattr(f, "name", f) for f in reserved} == set()


def test_a_bare_boolean_flag_means_yes():
    config = settings.parse("client_bench", ["--restart"])
    assert config.restart is True and settings.parse("client_bench", []).restart is False
    assert config.source == ("127.1.0.9", "127.1.0.10")


def test_the_smoke_run_and_a_client_read_their_own_qps_from_the_environment():
    environ = {"HONGBAO_QPS": "7", "HONGBAO_SMOKE_QPS": "9000"}
    assert resolve("client", environ=environ).qps == 7
    assert resolve("smoke", environ=environ).qps == 9000


@pytest.mark.parametrize("environ,words", [
    ({"HONGBAO_AMOUNT_MIN": "500", "HONGBAO_AMOUNT_MAX": "1"},
     ["amount_min = '500' (env HONGBAO_AMOUNT_MIN)", "amount_max = '1'", "must not exceed"]),
    ({"HONGBAO_GROUP_AMOUNT_MIN": "2"}, ["group_amount_min = '2'", ">= 3", "3 shares"]),
    ({"HONGBAO_GROUP_AMOUNT_MIN": "40", "HONGBAO_GROUP_AMOUNT_MAX": "30"},
     ["group_amount_min = '40'", "group_amount_max = '30'", "must not exceed"]),
    ({"HONGBAO_SETS": "4", "HONGBAO_SHAKE_BUDGET": "3"},
     ["shake_budget = '3'", "below the SET count 4", "at least 1 SHAKE/s"]),
    ({"HONGBAO_STATSD": "localhost"}, ["statsd (env HONGBAO_STATSD)", "expected HOST:PORT"]),
    ({"HONGBAO_STATSD": ":8125"}, ["statsd", "expected HOST:PORT"]),
])
def test_a_bad_server_setting_names_the_settings_and_the_reason(environ, words):
    with pytest.raises(SettingError) as info:
        resolve("server", environ=environ)
    for word in words:
        assert word in str(info.value)


def test_the_budget_rule_applies_to_auto_sets_once_counted():
    config = resolve("server", environ={"HONGBAO_SHAKE_BUDGET": "3"})  # sets auto: not yet
    settings.check_budget(config, 3)
    with pytest.raises(SettingError, match="below the SET count 4"):
        settings.check_budget(config, 4)


def test_a_client_host_index_must_be_inside_the_fleet():
    with pytest.raises(SettingError, match="host_index = '3'.*hosts = '3'"):
        resolve("client", environ={"HONGBAO_HOSTS": "3", "HONGBAO_HOST_INDEX": "3"})
    assert resolve("client", environ={"HONGBAO_HOSTS": "3", "HONGBAO_HOST_INDEX": "2"})


def test_the_sets_get_every_server_setting_but_the_token():
    config = resolve("server", environ={"HONGBAO_AMOUNT_MAX": "77", "HONGBAO_TOKEN": "s3cret",
                                        "HONGBAO_STATSD": "127.0.0.1:8125"})
    text = to_json(config)
    assert "s3cret" not in text
    copy = from_json("server", text)
    served = {s.name for s in settings.settings_for("server") if not s.secret}
    assert {k: copy[k] for k in served} == {k: config[k] for k in served}
    assert copy.token == "" and copy["amount_max"] == 77


def test_the_sets_check_their_copy_too():
    with pytest.raises(SettingError, match="amount_min"):
        from_json("server", '{"amount_min": "9", "amount_max": "3"}')
    with pytest.raises(SettingError, match="unknown"):
        from_json("server", '{"amount_minimum": "9"}')


def test_a_campaign_over_4_sets_keeps_its_sum():
    assert campaign_shares(2, 8, 4) == [(1, 4), (1, 4), (0, 0), (0, 0)]
    assert campaign_shares(0, 8, 4) == [(0, 2)] * 4


@given(st.integers(0, 10**6), st.integers(0, 2**40), st.integers(1, 200))
def test_campaign_shares_add_up_to_the_rate_and_the_sum_for_any_set_count(rate, total, sets):
    parts = campaign_shares(rate, total, sets)
    assert len(parts) == sets
    assert sum(r for r, _ in parts) == rate
    assert sum(s for _, s in parts) == total
    assert [r for r, _ in parts] == [share(rate, sets, k) for k in range(sets)]
    if rate:
        assert all(s == 0 for r, s in parts if r == 0)  # nothing left where nothing generates
        # in proportion: no SET's sum is off its rate's part by a whole envelope or more
        assert all(abs(s - total * r / rate) < 1 for r, s in parts)


def test_the_scale_bench_reads_the_same_table_under_its_own_names():
    environ = {"HONGBAO_SCALE_PHASES": "3000,6000", "HONGBAO_CONNECTIONS": "5",
               "HONGBAO_TICKS": "50", "HONGBAO_SCALE_TICKS": "25"}
    config = resolve("scale", environ=environ)
    assert config.phases == (3000, 6000) and config.ticks == 25
    assert resolve("client", environ=environ).ticks == 50
    assert config.connections == 1_000_000  # a client's HONGBAO_CONNECTIONS is not the bench's
    assert resolve("scale", environ={"HONGBAO_SCALE_PHASES": ""}).phases == ()
    with pytest.raises(SettingError, match="phases"):
        resolve("scale", environ={"HONGBAO_SCALE_PHASES": "100,-5"})


def test_the_floor_bench_reads_the_one_settings_table():
    """``python -m app.bench.floor`` has no parser of its own: flags, env, checks as elsewhere."""
    config = settings.parse("floor_bench", ["--phases", "3000,6000", "--ticks", "20"])
    assert (config.phases, config.ticks, config.connections) == ((3000, 6000), 20, 20000)
    with pytest.raises(SystemExit):
        settings.parse("floor_bench", ["--hosts", "0"])


@pytest.mark.parametrize("section, default", [("client", 100), ("smoke", 100), ("scale", -1),
                                              ("floor_bench", 100)])
def test_the_quiet_end_is_part_of_a_second_everywhere_it_paces(section, default):
    """One setting of four sections, as ``pacing``: HONGBAO_QUIET_MS, but the scale
    bench's own ('auto', -1: it picks by its ticks, ``test_scale_bench_picks_...``)."""
    assert resolve(section, environ={}).quiet_ms == default
    env = "HONGBAO_SCALE_QUIET_MS" if section == "scale" else "HONGBAO_QUIET_MS"
    assert resolve(section, environ={"HONGBAO_QUIET_MS" if section == "scale"
                                     else "HONGBAO_SCALE_QUIET_MS": "0"}).quiet_ms == default
    assert resolve(section, environ={env: "0"}).quiet_ms == 0
    for bad in ("1000", "-1"):
        with pytest.raises(SettingError, match="quiet_ms"):
            resolve(section, environ={env: bad})
