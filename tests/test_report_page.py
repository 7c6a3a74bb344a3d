"""The report a user opens, from two short REAL smoke runs: the page, the comparison, a browser.

The runs differ only in rate (peak 1,000 and 1,500 SHAKEs a second). Every
check holds the page against the run's own ``summary.json`` and
``seconds.jsonl``, computed here independently of monitor.report: the verdict
and its reasons, the phase table's figures, the ledger in yuan, and every
graph's points (each PNG carries the points it shows). Then the comparison's
deltas, and both pages in a real headless Chromium: no console errors, no
missing images, also from a copy of the run directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from monitor.runs import drawn_series
from tests import browser

ROOT = Path(__file__).resolve().parent.parent


def smoke(run_root: Path, qps: int) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "app.local.smoke", "--connections", "1200", "--hosts", "2",
         "--qps", str(qps), "--idle-seconds", "2", "--phase-seconds", "5",
         "--run-dir", str(run_root)],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    (run_dir,) = run_root.iterdir()
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: a verdict of FAIL
    assert (run_dir / "index.html").exists(), proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("report")
    return smoke(root / "a", 1000), smoke(root / "b", 1500)


class Page(HTMLParser):
    """The parts of a page the checks read: texts by element id, tables, images."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.ids: dict[str, str] = {}
        self.tables: dict[str, list[list[tuple[str, str]]]] = {}  # id -> rows of (class, text)
        self.images: list[str] = []
        self.reasons: list[str] = []
        self._open: list[tuple[str, str | None]] = []  # (tag, id) of elements with ids
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._cls = ""
        self._in_reasons = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if a.get("id"):
            self._open.append((tag, a["id"]))
            self.ids[a["id"]] = ""
        if tag == "table":
            self._table = a.get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell, self._cls = [], a.get("class") or ""
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "li" and self._open and self._open[-1][1] == "reasons":
            self._in_reasons = True
            self.reasons.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append((self._cls, "".join(self._cell).strip()))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "li":
            self._in_reasons = False
        if self._open and self._open[-1][0] == tag:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for _, element in self._open:
            self.ids[element] += data
        if self._cell is not None:
            self._cell.append(data)
        if self._in_reasons:
            self.reasons[-1] += data


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "seconds.jsonl").read_text().splitlines()]


def changes(rows: list[dict], key: str) -> list[tuple[float, float]]:
    """A running total as what changed in each second (as the graphs draw it)."""
    return [(float(b["t"]), round(b[key] - a[key], 6))
            for a, b in zip(rows, rows[1:], strict=False)]


def spread(rows: list[dict], key: str) -> list[tuple[float, float]]:
    """A running total read less often than each second (CPU): each change as an even
    rate over the seconds since the previous change, a repeated reading drawn nowhere."""
    out: list[tuple[float, float]] = []
    last: tuple[float, float] | None = None
    for r in rows:
        if r.get(key) is None:
            continue
        t, v = float(r["t"]), r[key]
        if last is not None and v != last[1]:
            seconds = int(t - last[0])
            out += [(last[0] + k, round((v - last[1]) / (t - last[0]), 6))
                    for k in range(1, seconds + 1)]
        if last is None or v != last[1]:
            last = (t, v)
    return out


def points(rows: list[dict], value) -> list[tuple[float, float]]:
    return [(float(r["t"]), float(value(r))) for r in rows if value(r) is not None]


def expected_graphs(rows: list[dict]) -> dict[str, dict[str, list]]:
    """Each PNG's points, from seconds.jsonl, computed without monitor.report."""
    mib = 2**20
    host = next(h for r in rows for h in r["net"])
    net = [r for r in rows if r["net"]]
    code = {"14": "14 got an envelope", "15": "15 none left", "16": "16 refused",
            "17": "17 overload"}
    results = {label: points([r for r in rows if c in r["server_by_result"]],
                             lambda r, c=c: r["server_by_result"][c])
               for c, label in code.items()}
    return {
        "qps.png": {"target": points(rows, lambda r: r["target_qps"]),
                    "server served": points(rows, lambda r: r["server_served"]),
                    "clients answered": points(rows, lambda r: r["client_served"]),
                    "scheduled (clients sent)": points(rows, lambda r: r["client_sent"])},
        "results.png": {k: v for k, v in results.items() if v},
        "latency.png": {"p50": points(rows, lambda r: r["latency_p50_ms"]),
                        "p99": points(rows, lambda r: r["latency_p99_ms"])},
        "server_health.png": {"loop lag": points(rows, lambda r: r["loop_lag_ms"]),
                              "GC pause": points(rows, lambda r: r["gc_pause_ms"])},
        "connections.png": {"server": points(rows, lambda r: r["connections"]),
                            "clients": points(rows, lambda r: r["client_connections"])},
        "cpu.png": {"server": spread(rows, "server_cpu_seconds"),
                    "clients": spread(rows, "client_cpu_seconds")},
        "memory.png": {"server": points(rows, lambda r: r["server_rss_bytes"] / mib),
                       "clients": points(rows, lambda r: r["client_rss_bytes"] / mib)},
        "network.png": {f"{host} in": points(net, lambda r: r["net"][host]["packets_in"]),
                        f"{host} out": points(net, lambda r: r["net"][host]["packets_out"])},
        "network_bytes.png": {
            f"{host} in": points(net, lambda r: r["net"][host]["bytes_in"] / mib),
            f"{host} out": points(net, lambda r: r["net"][host]["bytes_out"] / mib)},
        "envelopes.png": {"generated": changes(rows, "envelopes_generated"),
                          "granted": changes(rows, "envelopes_granted"),
                          "group claimed": changes(rows, "group_claimed")},
        "amounts.png": {"generated": changes(rows, "amount_generated"),
                        "granted": changes(rows, "amount_granted")},
    }


def yuan(cents: int) -> str:
    return f"¥{cents // 100:,}.{cents % 100:02d}"


@pytest.mark.slow
def test_the_page_of_a_real_run_shows_its_verdict_table_ledger_and_graphs(runs):
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        page = Page((run / "index.html").read_text())
        # the verdict first, with every reason the terminal printed
        assert page.ids["verdict"] == ("PASS" if summary["passed"] else "FAIL")
        assert page.reasons == summary["reasons"]
        # the phase table: the terminal's figures, served by arrival
        head, *body = page.tables["phases"]
        columns = [text for _, text in head]
        assert columns[:8] == ["phase", "target /s", "server served /s", "clients answered /s",
                               "server ±2%", "clients ±2%", "p50", "p99"]
        assert len(body) == len(summary["phases"]) == 3
        for cells, phase in zip(body, summary["phases"], strict=True):
            text = dict(zip(columns, (t for _, t in cells), strict=True))
            assert text["phase"] == phase["phase"]
            assert text["target /s"] == f"{phase['target']:,}"
            assert text["server served /s"] == f"{round(phase['server_qps']):,}"
            assert text["clients answered /s"] == f"{round(phase['client_qps']):,}"
            assert text["scheduled: counted / sent"] == (
                f"{phase['scheduled_counted']:,} / {phase['scheduled_sent']:,}")
            if phase["target"]:
                assert phase["scheduled_sent"] == 5 * phase["target"]
                share = round(100 * phase["server_within"], 1)
                assert text["server ±2%"].rstrip("%") in (f"{share:.0f}", f"{share:.1f}")
                p99 = phase["latency_p99_ms"]
                assert text["p99"] == (f"{p99:.2f} ms" if p99 < 10 else f"{p99:.1f} ms"
                                       if p99 < 100 else f"{round(p99):,} ms")
                marks = dict(zip(columns, (c for c, _ in cells), strict=True))
                assert ("bad" in marks["p99"]) == (p99 >= 100)
            else:
                assert text["server ±2%"] == "-" and text["p99"] == "-"
        # the ledger equation in yuan
        ledger = summary["ledger"]
        line = page.ids["ledger"]
        for part in ("generated", "granted", "waiting", "expired"):
            v = ledger[part]
            assert f"{part} {v['count']:,} ({yuan(v['amount'])})" in line
        assert line.endswith("balanced") and ledger["balanced"]
        # every graph, point by point, against seconds.jsonl
        rows = records(run)
        expected = expected_graphs(rows)
        assert sorted(page.images) == sorted(expected)
        for png in page.images:
            got = drawn_series(run / png)
            assert got.keys() == expected[png].keys(), png
            for label, line_points in expected[png].items():
                assert [x for x, _ in got[label]] == [x for x, _ in line_points], (png, label)
                assert [y for _, y in got[label]] == pytest.approx(
                    [y for _, y in line_points]), (png, label)
        # numbers for people, paths relative to the run directory
        html = (run / "index.html").read_text()
        assert str(run) not in html and "e+0" not in html
        assert 'src="http' not in html and "url(" not in html


@pytest.mark.slow
def test_compare_two_real_runs_that_differ_in_rate(runs, tmp_path):
    a, b = runs
    out = tmp_path / "cmp"
    done = subprocess.run([sys.executable, "-m", "monitor.report", "--compare", str(a), str(b),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in runs)
    compared = json.loads((out / "compare.json").read_text())
    assert compared["a"] == os.path.relpath(a, out) and compared["b"] == os.path.relpath(b, out)
    page = Page((out / "index.html").read_text())
    better = {"server_qps": 1, "client_qps": 1, "server_within": 1, "latency_p50_ms": -1,
              "latency_p99_ms": -1, "cpu_us_per_request": -1, "server_cpu_us_per_request": -1,
              "server_bytes_per_connection": -1, "client_bytes_per_connection": -1}
    for i, (pa, pb) in enumerate(zip(sa["phases"], sb["phases"], strict=True)):
        figures = {f["key"]: f for f in compared["phases"][i]["figures"]}
        assert figures["target"]["delta"] == pb["target"] - pa["target"] == [0, 150, 300][i]
        table = {cells[0][1]: cells for cells in page.tables[f"phase-{i}"][1:]}
        for key, sign in better.items():
            if pa.get(key) is None or pb.get(key) is None:
                continue
            change = pb[key] - pa[key]
            assert figures[key]["delta"] == pytest.approx(change)
            relative = change / pa[key] if pa[key] else None
            small = change == 0 or (relative is not None and abs(relative) < 0.01)
            want = "same" if small else "better" if change * sign > 0 else "worse"
            assert figures[key]["verdict"] == want, key
            cls, _ = table[figures[key]["label"]][3]
            assert cls.split() == ["n", want], (key, cls)  # the colour of the delta
        if pa["target"]:  # the rate achieved, as the page prints it
            assert table["server served /s"][1][1] == f"{round(pa['server_qps']):,}"
            assert table["server served /s"][2][1] == f"{round(pb['server_qps']):,}"
    # overlaid graphs on a time axis from each phase's start
    served = drawn_series(out / "compare-served.png")
    ra, rb = records(a), records(b)
    for panel, (pa, pb) in enumerate(zip(sa["phase_plan"][1:], sb["phase_plan"][1:],
                                         strict=True)):
        for label, plan, rows in (("A", pa, ra), ("B", pb, rb)):
            want = [(float(r["t"] - plan["start"]), float(r["server_served"])) for r in rows
                    if plan["start"] <= r["t"] < plan["end"]]
            assert served[f"{panel}/{label}"] == want
    assert sorted(page.images) == sorted(compared["graphs"])


def require_browser() -> None:
    if not browser.available():
        if os.environ.get("HONGBAO_BROWSER_REQUIRED"):
            pytest.fail("chromium and chromedriver are required (.ci/apt-packages.txt)")
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/apt-packages.txt)")


@pytest.mark.slow
def test_pages_load_in_headless_chromium_with_no_errors_and_no_missing_images(runs, tmp_path):
    require_browser()
    a, b = runs
    copied = tmp_path / "copied" / a.name  # a run directory opens from a copy
    shutil.copytree(a, copied)
    bad = tmp_path / "bad.html"  # the check itself can fail
    bad.write_text('<!doctype html><html><head><title>x</title></head><body>'
                   '<img src="nothing.png"><script>console.error("boom")</script></body></html>')
    cmp_out = tmp_path / "cmp"
    subprocess.run([sys.executable, "-m", "monitor.report", "--compare", str(a), str(b),
                    "--out", str(cmp_out)], cwd=ROOT, check=True, capture_output=True,
                   timeout=120)
    with browser.Browser() as chrome:
        seen_bad = chrome.open(bad)
        assert seen_bad["broken"] == ["nothing.png"]
        assert any("boom" in m["message"] for m in seen_bad["console"])
        for page, verdict_from in ((a / "index.html", a), (b / "index.html", b),
                                   (copied / "index.html", a)):
            seen = chrome.open(page)
            summary = json.loads((verdict_from / "summary.json").read_text())
            assert seen["console"] == [], (page, seen["console"])
            assert seen["broken"] == [], page
            assert len(seen["images"]) == 11
            assert seen["verdict"] == ("PASS" if summary["passed"] else "FAIL")
        seen = chrome.open(cmp_out / "index.html")
        assert seen["console"] == [] and seen["broken"] == []
        assert sorted(seen["images"]) == sorted(
            json.loads((cmp_out / "compare.json").read_text())["graphs"])


@pytest.mark.slow
def test_the_scale_bench_run_directory_gets_the_same_page(tmp_path):
    run = tmp_path / "scale"
    done = subprocess.run(
        [sys.executable, "-m", "app.bench", "scale", "--connections", "2000", "--hosts", "2",
         "--phases", "500,1000", "--hold", "1", "--phase-seconds", "5", "--floor", "no",
         "--netns", "no", "--run-dir", str(run)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((run / "result.json").read_text())
    page = Page((run / "index.html").read_text())
    assert page.ids["verdict"] == ("PASS" if result["passed"] else "FAIL")
    assert page.reasons == result["reasons"]
    assert f"verdict: {page.ids['verdict']}" in done.stdout
    head, *body = page.tables["phases"]
    columns = [text for _, text in head]
    assert [cells[0][1] for cells in body] == [p["phase"] for p in result["phases"]]
    for cells, phase in zip(body, result["phases"], strict=True):
        text = dict(zip(columns, (t for _, t in cells), strict=True))
        assert text["server served /s"] == f"{round(phase['server_qps']):,}"
        assert text["scheduled: counted / sent"] == (
            f"{phase['scheduled_counted']:,} / {phase['scheduled_sent']:,}")
    head, *body = page.tables["costs"]
    columns = [text for _, text in head]
    for cells, phase in zip(body, result["phases"], strict=True):
        text = dict(zip(columns, (t for _, t in cells), strict=True))
        assert text["client CPU/req"] == f"{phase['client_cpu_us_per_request']:,.1f} µs"
    # the phases found from the records shade the graphs and match the plan
    expected = expected_graphs(records(run))
    assert sorted(page.images) == sorted(expected)
    qps = drawn_series(run / "qps.png")
    assert qps["target"] == expected["qps.png"]["target"]
    assert sorted({v for _, v in qps["target"]}) == [500.0, 1000.0]
