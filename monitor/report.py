"""A run's report: one HTML page, verdict first, then the classic graphs as PNGs.

How to run::

    python -m monitor.report --run runs/20261125-183000              # the run's window
    python -m monitor.report --compare runs/A runs/B                  # two runs side by side
    python -m monitor.report --run DIR --graphite http://127.0.0.1:8180
    python -m monitor.report --run DIR --from 2026-11-25T18:30:00 --until 2026-11-25T18:40:00
    python -m monitor.report --run DIR --from -15min                  # ends now

Source: Graphite's render API (JSON) when it answers -- the URL given, else
HONGBAO_GRAPHITE_URL (``make smoke`` sets it when the stack is up), else
(command line only) the stack that ``python -m monitor.stack up`` started --
otherwise the run's own per-second records, ``DIR/seconds.jsonl``. Both sources are drawn by
the same code from the same table (monitor.views), so the graphs compare.
The page (monitor.page) opens with the run's verdict and phase table from its
``summary.json`` (smoke) or ``result.json`` (scale bench), and needs nothing
but the run directory: it opens from a copy, offline. With Graphite, the
report also saves graphite-web's own PNG of the QPS view
(``graphite-qps.png``: rendered by cairo in the stack).

Time alignment: statsd stamps a flush with its second, and processes flush
at the half second (app.metrics.statsd). A counter counted as it happens (the
server's) lands in point t for the events of [t-1.5, t-0.5); a client agent
counts a second once all its workers reported it, so its second s lands in
point s+2. The report draws point t at t-2: client and server lines then
step on the same second as the target in seconds.jsonl (record t holds
[t, t+1)), as measured in a smoke run, and sums over a window are unchanged.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import logging
import math
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from monitor import page
from monitor.runs import RECORDS, PhaseSpan, finite, load_run, save_png
from monitor.views import VIEWS, View, graphite_urls

log = logging.getLogger("hongbao.report")

GRAPHITE_SHIFT = 2.0  # seconds to subtract from a Graphite timestamp, see above

Points = list[tuple[float, float]]  # (epoch second, value), values without gaps


@dataclass
class Drawn:
    """What one PNG shows: for the summary and for tests."""

    view: View
    path: Path
    series: dict[str, Points] = field(default_factory=dict)

    def summary(self, label: str) -> float:
        values = [v for _, v in self.series[label]]
        return sum(values) if self.view.counts else max(values)


# -- sources -----------------------------------------------------------------------------


def _record_values(record: dict, key: str, subkey: str | None,
                   per_item: bool) -> dict[str, object]:
    """{"": value} of one record, or {host: value} for a per-host key."""
    value = record.get(key)
    if per_item:
        items = value if isinstance(value, dict) else {}
        return {host: v.get(subkey) for host, v in items.items() if isinstance(v, dict)}
    if subkey is not None:
        value = value.get(subkey) if isinstance(value, dict) else None
    return {"": value}


def spread_readings(points: Points) -> Points:
    """Per-second rates of a running total read less often than each second.

    A second that repeats the previous value repeats the previous reading; the
    next change is spread evenly over every second since the last one, instead
    of drawing a zero and then a double.
    """
    out: Points = []
    last_t, last_v = None, None
    for t, v in points:
        if last_t is None:
            last_t, last_v = t, v
            continue
        if v == last_v:
            continue
        span = t - last_t
        rate = (v - last_v) / span if span > 0 else 0.0
        out.extend((last_t + k + 1, round(rate, 6)) for k in range(int(span)))
        last_t, last_v = t, v
    return out


def series_from_records(records: list[dict], view: View, start: float = -math.inf,
                        end: float = math.inf) -> dict[str, Points]:
    """{label: points} in [start, end] for the view's series whose key the records carry."""
    out: dict[str, Points] = {}
    for s in view.series:
        if s.key is None:
            continue
        lines: dict[str, Points] = {}
        for r in records:
            for item, value in _record_values(r, s.key, s.subkey, s.per_item).items():
                if finite(value):
                    label = f"{item} {s.label}" if item else s.label
                    lines.setdefault(label, []).append((float(r["t"]), float(value)))
        for label, points in lines.items():
            if s.sampled:  # keep each reading once: a rate over the seconds it spans
                points = spread_readings(points)
            elif s.cumulative:  # a running total each second: what changed in that second
                deltas = [(t, v - before) for (_, before), (t, v) in itertools.pairwise(points)]
                if all(v >= 0 for _, v in deltas):  # else it was per-second after all
                    points = [(t, round(v, 6)) for t, v in deltas]
            points = [(t, v * s.scale) for t, v in points if start <= t <= end]
            if points:
                out[label] = points
    return out


def series_from_graphite(url: str, view: View, start: int, end: int) -> dict[str, Points]:
    """{label: points} for the view's series that Graphite has data for in [start, end]."""
    from monitor.stack import fetch_series

    out: dict[str, Points] = {}
    for s in view.series:
        if not s.target:
            continue
        # Ask 2 s past both ends: the shift moves points across the edges.
        try:
            result = fetch_series(url, s.target, start - 2, end + 3)
        except (OSError, ValueError) as exc:  # one bad series must not cost the report
            log.warning("graphite %s: %s", s.target, exc)
            continue
        lines: dict[str, Points] = {}
        for item in result:
            label = f"{item['target']} {s.label}" if s.per_item else s.label
            # Keep the points of the window's seconds, [start, end].
            points = [(ts - GRAPHITE_SHIFT, float(v)) for v, ts in item["datapoints"]
                      if v is not None and start <= ts - GRAPHITE_SHIFT <= end]
            if points:
                lines.setdefault(label, []).extend(points)
        out.update(lines)
    return out


def graphite_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(
                f"{url}/render?target=constantLine(1)&format=json&from=-1min", timeout=3) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def find_graphite(running: bool = False) -> str | None:
    """HONGBAO_GRAPHITE_URL, else (running=True) the local stack's URL, else None.

    ``make smoke`` sets HONGBAO_GRAPHITE_URL exactly when the run sent its
    metrics to the stack; a run that did not must not be drawn from whatever
    else the stack recorded in that window, so only the command line (a
    person asking for a report) also looks for a running stack.
    """
    url = os.environ.get("HONGBAO_GRAPHITE_URL")
    if url or not running:
        return url or None
    from monitor.stack import running_stack

    stack = running_stack()
    return stack.graphite_url if stack is not None else None


# -- drawing -----------------------------------------------------------------------------


def draw(view: View, series: dict[str, Points], path: Path, subtitle: str,
         spans: list[PhaseSpan] = (), window: tuple[int, int] | None = None) -> None:
    """One PNG: the view's series over wall-clock time (UTC), the loaded phases shaded.

    The points drawn are saved in the PNG itself (text chunk ``hongbao-series``),
    so a check can hold the picture against the run's records.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    def when(t: float) -> dt.datetime:
        return dt.datetime.fromtimestamp(t, dt.UTC)

    dashed = {s.label for s in view.series if s.dashed}
    fig, ax = plt.subplots(figsize=(10, 3.6), dpi=100)
    try:
        for span in spans:
            if span.target:
                ax.axvspan(when(span.start), when(span.end), color="#888", alpha=0.08, lw=0)
                ax.annotate(span.name, (when(span.start), 1), xycoords=("data", "axes fraction"),
                            xytext=(3, -12), textcoords="offset points", fontsize=8,
                            color="#555")
                if view.name == "qps":  # the band a served second must fall in
                    ax.fill_between([when(span.start), when(span.end)], span.target * 0.98,
                                    span.target * 1.02, color="#1a7f37", alpha=0.15, lw=0)
        for label, points in series.items():
            ax.plot([when(t) for t, _ in points], [v for _, v in points],
                    "--" if label in dashed else "-", label=label, linewidth=1.4,
                    drawstyle="steps-post" if view.counts else "default")
        ax.set_title(f"{view.title}\n{subtitle}", fontsize=11)
        ax.set_ylabel(view.ylabel)
        ax.set_xlabel("time (UTC)")
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=dt.UTC))
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        if window is not None:  # every graph of a page on the same time axis
            ax.set_xlim(when(window[0]), when(window[1] + 1))
        ax.legend(loc="best", fontsize=9)
        fig.autofmt_xdate()
        fig.tight_layout()
        save_png(fig, path, series)
    finally:
        plt.close(fig)


def save_graphite_png(url: str, run_dir: Path, start: int, end: int) -> Path | None:
    """graphite-web's own rendering of the QPS view, for a look at the live tool."""
    png = graphite_urls(url, start - 2, end + 3)["qps"]
    path = run_dir / "graphite-qps.png"
    try:
        with urllib.request.urlopen(png, timeout=15) as resp:
            data = resp.read()
    except (OSError, ValueError):
        return None
    if not data.startswith(b"\x89PNG"):
        return None
    path.write_bytes(data)
    return path


# -- the job -----------------------------------------------------------------------------


def build_report(run_dir: Path | str, graphite_url: str | None = None,
                 start: int | None = None, end: int | None = None) -> list[Drawn]:
    """Draw every view that has data; return what was drawn (write_report's worker)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = load_run(run_dir)
    records = run.records
    if start is None:
        start = int(records[0]["t"]) if records else int(time.time()) - 900
    if end is None:
        end = int(records[-1]["t"]) if records and start <= records[-1]["t"] else int(time.time())
    if end < start:
        raise ValueError(f"empty window: {start} > {end}")
    url = graphite_url if graphite_url is not None else find_graphite()
    use_graphite = bool(url) and graphite_answers(url)

    collected: list[tuple[View, dict[str, Points]]] = []
    from_graphite = 0
    filled: list[str] = []  # series Graphite should have had, drawn from the records
    for view in VIEWS:
        series = series_from_graphite(url, view, start, end) if use_graphite else {}
        from_graphite += len(series)
        # Series Graphite lacks (target QPS; a run that sent no metrics) come
        # from the run's own records.
        for label, points in series_from_records(records, view, start, end).items():
            if label not in series:
                series[label] = points
                if use_graphite and any(v for _, v in points) and any(
                        s.label == label and s.target for s in view.series):
                    filled.append(f"{view.name}/{label}")
        collected.append((view, series))
    if use_graphite and from_graphite:
        source = f"Graphite {url}"
        if filled:
            source += f"; from {RECORDS}: {', '.join(filled)}"
    else:
        source = RECORDS  # the run directory's own, named relative to it
        if use_graphite:  # it answered, but nothing of this run was sent to it
            source += f" (Graphite {url} had no data for this window)"
        use_graphite = False

    drawn: list[Drawn] = []
    missing: list[View] = []
    for view, series in collected:
        if not series:
            missing.append(view)
            continue
        path = run_dir / f"{view.name}.png"
        draw(view, series, path, f"{run_dir.name} · {source.split(';')[0]}", run.spans,
             (start, end))
        drawn.append(Drawn(view, path, series))
    extra = []
    links: dict[str, str] = {}
    if use_graphite:
        png = save_graphite_png(url, run_dir, start, end)
        extra = [png] if png else []
        links = graphite_urls(url, start - 2, end + 3)
    page.write_page(run, page.Graphs([(d.view, d.path.name) for d in drawn], missing,
                                     [p.name for p in extra], links, source, start, end))
    (run_dir / "report.json").write_text(json.dumps({
        "source": source, "filled_from_records": filled, "start": start, "end": end,
        "graphs": {d.view.name: {"png": d.path.name,
                                 "series": {k: d.summary(k) for k in d.series}}
                   for d in drawn},
        "missing": [v.name for v in missing],
        "graphite_png": extra[0].name if extra else None,
    }, indent=1))
    return drawn


def write_report(run_dir: Path | str, graphite_url: str | None = None,
                 start: int | None = None, end: int | None = None) -> list[Path]:
    """Write the PNGs and index.html into run_dir; return their paths (HTML last).

    graphite_url None means HONGBAO_GRAPHITE_URL if set (``make smoke`` sets
    it when the stack is up), else the run's seconds.jsonl; "" means the
    records only. start/end (epoch seconds) default to the run's records.
    """
    run_dir = Path(run_dir)
    drawn = build_report(run_dir, graphite_url, start, end)
    extra = run_dir / "graphite-qps.png"
    paths = [d.path for d in drawn]
    if extra.exists() and json.loads((run_dir / "report.json").read_text())["graphite_png"]:
        paths.append(extra)
    return [*paths, run_dir / "index.html"]


def parse_time(text: str, now: float | None = None) -> int:
    """Epoch seconds from an epoch number, an ISO 8601 time (UTC if naive) or -15min/-2h/-30s."""
    now = time.time() if now is None else now
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return int(float(text))
    m = re.fullmatch(r"-(\d+)(s|sec|min|h|d)", text)
    if m:
        unit = {"s": 1, "sec": 1, "min": 60, "h": 3600, "d": 86400}[m.group(2)]
        return int(now) - int(m.group(1)) * unit
    when = dt.datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitor.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="run directory (output; seconds.jsonl input)")
    parser.add_argument("--graphite", help="graphite-web URL (default: HONGBAO_GRAPHITE_URL, "
                        "else the local stack if it is up); '' for the run's records only")
    parser.add_argument("--from", dest="start", help="epoch, ISO 8601 (UTC) or -15min")
    parser.add_argument("--until", dest="end", help="epoch, ISO 8601 (UTC) or -1min; now")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("RUN_A", "RUN_B"),
                        help="write one page comparing two run directories")
    parser.add_argument("--out", type=Path, help="with --compare: the output directory "
                        "(default: compare-A-vs-B next to RUN_A)")
    args = parser.parse_args(argv)
    if args.compare:
        from monitor.compare import write_compare

        try:
            page = write_compare(*args.compare, args.out)
        except (OSError, ValueError) as exc:
            print(f"monitor.report: {exc}", file=sys.stderr)
            return 1
        print(f"comparison: {page}")
        return 0
    now = time.time()
    start = parse_time(args.start, now) if args.start else None
    end = parse_time(args.end, now) if args.end else None
    if start is not None and end is None:
        end = int(now)
    run_dir = args.run or Path("runs") / time.strftime("report-%Y%m%d-%H%M%S", time.gmtime())
    try:
        url = args.graphite if args.graphite is not None else find_graphite(running=True)
        paths = write_report(run_dir, url or "", start, end)
    except (OSError, ValueError, urllib.error.URLError) as exc:
        print(f"monitor.report: {exc}", file=sys.stderr)
        return 1
    report = json.loads((Path(run_dir) / "report.json").read_text())
    print(f"report from {report['source']}: {len(paths) - 1} graphs")
    for path in paths:
        print(f"  {path}")
    if report["missing"]:
        print(f"  (no data for: {', '.join(report['missing'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
