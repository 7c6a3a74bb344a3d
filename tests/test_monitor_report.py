"""monitor.report without Graphite: the run's seconds.jsonl, and a fake render API.

The fake render API is a real HTTP server on a free loopback port that
answers /render like graphite-web (JSON, and a PNG for the saved view), so
the Graphite path is tested here without the stack; the real stack is
tested in test_monitor_stack.py.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from monitor import report, runs, views

T0 = 1_795_600_000


def write_records(run_dir, seconds: int = 30, skip: tuple[str, ...] = ()) -> list[dict]:
    rows = []
    for i in range(seconds):
        q = 1000 if i < seconds // 2 else 2000
        row = {"t": T0 + i, "client_sent": q, "client_served": q - 3, "server_served": q - 3,
               "server_scheduled": q, "server_by_result": {"14": q // 10, "15": q - q // 10 - 3,
                                                           "17": 3},
               "connections": 3000, "client_connections": 2990 + i % 2,
               # ledger and CPU totals, as app.local.smoke writes them: drawn as changes
               "envelopes_generated": 50 * i, "envelopes_granted": 40 * i,
               "group_claimed": 9 * i, "amount_generated": 5000 * i, "amount_granted": 4000 * i,
               "server_cpu_seconds": 0.25 * i, "client_cpu_seconds": 0.5 * i,
               "server_rss_bytes": 2**20 * (100 + i), "client_rss_bytes": 2**20 * 300,
               "loop_lag_ms": 1.0 + i % 4, "gc_pause_ms": 0.5,
               "net": {"box": {"packets_in": 4 * q, "packets_out": 4 * q + 1,
                               "bytes_in": 2**20 * q, "bytes_out": 2**20 * q}},
               "latency_p50_ms": 0.8, "latency_p99_ms": 3.0 + i % 3, "target_qps": q}
        rows.append({k: v for k, v in row.items() if k not in skip})
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "seconds.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.write('{"t": 17956')  # a run killed mid-write
    return rows


ALL_VIEWS = {f"{v.name}.png" for v in views.VIEWS}


def test_report_from_run_records(tmp_path):
    run = tmp_path / "run"
    rows = write_records(run)
    paths = report.write_report(run, graphite_url="http://127.0.0.1:9")  # nobody there
    names = [p.name for p in paths]
    assert names[-1] == "index.html"
    assert set(names[:-1]) == ALL_VIEWS
    for p in paths[:-1]:
        assert p.read_bytes().startswith(b"\x89PNG") and p.stat().st_size > 5000
    summary = json.loads((run / "report.json").read_text())
    assert summary["source"] == "seconds.jsonl"
    assert (summary["start"], summary["end"]) == (T0, T0 + 29)
    qps = summary["graphs"]["qps"]["series"]
    assert qps["server served"] == qps["clients answered"] == sum(
        r["server_served"] for r in rows)
    assert qps["scheduled (clients sent)"] == sum(r["client_sent"] for r in rows)
    assert summary["graphs"]["results"]["series"]["14 got an envelope"] == sum(
        r["server_by_result"]["14"] for r in rows)
    assert summary["graphs"]["results"]["series"]["17 overload"] == 3 * 30
    assert summary["graphs"]["latency"]["series"]["p99"] == 5.0  # a level: the peak
    assert summary["graphs"]["envelopes"]["series"] == {
        "generated": 50 * 29, "granted": 40 * 29, "group claimed": 9 * 29}
    assert summary["graphs"]["amounts"]["series"] == {"generated": 5000 * 29,
                                                      "granted": 4000 * 29}
    assert summary["graphs"]["server_health"]["series"] == {"loop lag": 4.0, "GC pause": 0.5}
    assert summary["graphs"]["cpu"]["series"] == {"server": 0.25, "clients": 0.5}
    assert summary["graphs"]["memory"]["series"] == {"server": 129.0, "clients": 300.0}
    assert summary["graphs"]["connections"]["series"] == {"server": 3000, "clients": 2991}
    assert summary["graphs"]["network"]["series"] == {"box in": 8000, "box out": 8001}
    assert summary["graphs"]["network_bytes"]["series"] == {"box in": 2000, "box out": 2000}
    assert summary["missing"] == []
    # each PNG carries the points it shows
    assert runs.drawn_series(run / "qps.png")["target"] == [
        (float(r["t"]), float(r["target_qps"])) for r in rows]
    html = (run / "index.html").read_text()
    for p in paths[:-1]:
        assert f'src="{p.name}"' in html


def test_missing_keys_are_skipped_and_the_window_is_respected(tmp_path):
    run = tmp_path / "run"
    write_records(run, skip=("net", "latency_p50_ms", "latency_p99_ms"))
    report.write_report(run, graphite_url="", start=T0 + 10, end=T0 + 19)
    summary = json.loads((run / "report.json").read_text())
    assert {"network", "network_bytes", "latency"} == set(summary["missing"])
    assert summary["graphs"]["qps"]["series"]["scheduled (clients sent)"] == 5 * 1000 + 5 * 2000


def test_no_records_and_no_graphite_gives_an_empty_page_not_an_error(tmp_path):
    paths = report.write_report(tmp_path / "empty", graphite_url="", start=T0, end=T0 + 5)
    assert [p.name for p in paths] == ["index.html"]
    page = (tmp_path / "empty" / "index.html").read_text()
    assert all(v.title in page for v in views.VIEWS)  # listed under "no data"


class FakeGraphite(BaseHTTPRequestHandler):
    """/render like graphite-web: JSON series with statsd-stamped points, a PNG for views."""

    points: dict[str, float] = {}

    def do_GET(self) -> None:
        url = urllib.parse.urlparse(self.path)
        query = urllib.parse.parse_qs(url.query)
        if query.get("format") != ["json"]:
            self.reply(b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "image/png")
            return
        target = query["target"][0]
        if target.startswith("constantLine"):  # report.graphite_answers() asks this
            self.reply(json.dumps([{"target": target, "datapoints": [[1, T0]]}]).encode(),
                       "application/json")
            return
        start, end = int(query["from"][0]), int(query["until"][0])
        value = self.points.get(target)
        body = [] if value is None else [{"target": target, "datapoints": [
            [value, ts] for ts in range(start, end + 1)]}]
        self.reply(json.dumps(body).encode(), "application/json")

    def reply(self, body: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_graphite():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeGraphite)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_report_from_graphite_shifts_points_and_keeps_record_only_series(tmp_path,
                                                                         fake_graphite):
    qps_view = next(v for v in views.VIEWS if v.name == "qps")
    FakeGraphite.points = {qps_view.series[1].target: 100.0,
                           qps_view.series[3].target: 100.0}
    run = tmp_path / "run"
    write_records(run, seconds=10)
    report.write_report(run, fake_graphite, start=T0, end=T0 + 9)
    summary = json.loads((run / "report.json").read_text())
    assert summary["source"].startswith(f"Graphite {fake_graphite}; from seconds.jsonl: ")
    assert "connections/server" in summary["filled_from_records"]
    assert "qps/server served" not in summary["filled_from_records"]
    assert "qps/clients answered" in summary["filled_from_records"]
    series = summary["graphs"]["qps"]["series"]
    # Points stamped t are drawn at t - 2: one per second of the window.
    assert series["scheduled (clients sent)"] == series["server served"] == 100.0 * 10
    assert series["target"] == 5 * 1000 + 5 * 2000  # only the run records have it
    # Graphite had nothing for the others: the run records fill in.
    assert summary["graphs"]["connections"]["series"] == {"server": 3000, "clients": 2991}
    assert summary["graphite_png"] == "graphite-qps.png"
    assert (run / "graphite-qps.png").read_bytes().startswith(b"\x89PNG")


def test_parse_time_forms():
    assert report.parse_time("1795600000") == 1795600000
    assert report.parse_time("-15min", now=1000.0) == 100
    assert report.parse_time("-2h", now=10_000.0) == 2800
    assert report.parse_time("2026-11-25T00:00:00") == report.parse_time(
        "2026-11-25T00:00:00+00:00")


def test_saved_urls_and_dashboard_cover_every_view():
    urls = views.graphite_urls("http://127.0.0.1:8180", T0, T0 + 60)
    # every view with a Graphite target; CPU and memory exist only in the run's records
    assert set(urls) == {v.name for v in views.VIEWS} - {"cpu", "memory"}
    assert "from=1795600000" in urls["qps"] and "target=alias" in urls["qps"]
    state = views.dashboard_state()
    assert [g[0] for g in state["graphs"]] == [v.name for v in views.GRAPHITE_VIEWS]
    qps = state["graphs"][0]
    assert qps[0] == "qps" and qps[1]["target"][0] == (
        "alias(sumSeries(stats.counters.hongbao.server.shakes.14.count,"
        "stats.counters.hongbao.server.shakes.15.count),'server served')")
    json.dumps(state)


def test_graphite_without_this_runs_data_says_so_and_uses_the_records(tmp_path, fake_graphite):
    FakeGraphite.points = {}
    run = tmp_path / "run"
    write_records(run, seconds=5)
    paths = report.write_report(run, fake_graphite)
    summary = json.loads((run / "report.json").read_text())
    assert summary["source"].endswith("had no data for this window)")
    assert summary["graphite_png"] is None
    assert "graphite-qps.png" not in [p.name for p in paths]


def test_a_per_second_key_declared_cumulative_is_drawn_as_it_is(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"t": T0 + i, "envelopes_generated": [5, 9, 3, 7][i]} for i in range(4)]
    (run / "seconds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report.write_report(run, graphite_url="")
    summary = json.loads((run / "report.json").read_text())
    assert summary["graphs"]["envelopes"]["series"] == {"generated": 24}


def test_write_report_uses_graphite_only_when_told(tmp_path, fake_graphite, monkeypatch):
    """A run that did not send metrics is not drawn from whatever Graphite holds."""
    qps_view = next(v for v in views.VIEWS if v.name == "qps")
    FakeGraphite.points = {qps_view.series[1].target: 100.0}
    run = tmp_path / "run"
    write_records(run, seconds=5)
    monkeypatch.delenv("HONGBAO_GRAPHITE_URL", raising=False)
    report.write_report(run)
    assert json.loads((run / "report.json").read_text())["source"].endswith("seconds.jsonl")
    monkeypatch.setenv("HONGBAO_GRAPHITE_URL", fake_graphite)
    report.write_report(run)
    assert json.loads((run / "report.json").read_text())["source"].startswith("Graphite")


def test_numbers_for_people():
    from monitor import numbers

    assert numbers.money(767936012) == "¥7,679,360.12"
    assert numbers.money(5) == "¥0.05" and numbers.money(-250) == "-¥2.50"
    assert numbers.count(59999.6) == "60,000" and numbers.count(None) == "-"
    assert [numbers.ms(x) for x in (0.8349, 12.345, 101.6, 4321.0)] == [
        "0.83 ms", "12.3 ms", "102 ms", "4,321 ms"]
    assert [numbers.share(x) for x in (0.95, 0.975, 1.0, None)] == ["95%", "97.5%", "100%", "-"]
    assert [numbers.size(x) for x in (306, 4900, 3 * 2**20, 1.5 * 2**30)] == [
        "306 B", "4.79 KiB", "3 MiB", "1.5 GiB"]


def test_phases_of_a_run_without_a_plan_come_from_the_records_targets():
    rows = [{"t": T0 + i, "target_qps": q} for i, q in enumerate([3000] * 4 + [6000] * 3)]
    spans = runs.spans_of({"phases": [{"phase": "3k"}, {"phase": "6k"}]}, rows)
    assert [(s.name, s.target, s.start, s.end) for s in spans] == [
        ("3k", 3000, T0, T0 + 4), ("6k", 6000, T0 + 4, T0 + 7)]


def test_compare_colours_a_change_by_which_way_is_better():
    from monitor import compare

    served = next(f for f in compare.FIGURES if f.key == "server_qps")
    p99 = next(f for f in compare.FIGURES if f.key == "latency_p99_ms")
    target = next(f for f in compare.FIGURES if f.key == "target")
    assert compare.delta(served, 1000, 900)["verdict"] == "worse"
    assert compare.delta(p99, 40.0, 20.0)["verdict"] == "better"
    assert compare.delta(p99, 40.0, 40.2)["verdict"] == "same"  # under 1%: noise
    assert compare.delta(target, 300, 450)["verdict"] == ""  # not judged
    assert compare.delta(p99, None, 3.0)["delta"] is None
    assert compare.shown_delta(p99, compare.delta(p99, 40.0, 20.0)) == "-20.0 ms (-50.0%)"
    within = next(f for f in compare.FIGURES if f.key == "server_within")
    assert compare.shown_delta(within, compare.delta(within, 1.0, 0.6)) == "-40.0 pt"
