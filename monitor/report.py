"""The classic graphs of a load test as PNGs plus a one-page HTML summary.

How to run::

    python -m monitor.report --run runs/smoke-20261125-1830          # the run's window
    python -m monitor.report --run DIR --graphite http://127.0.0.1:8180
    python -m monitor.report --run DIR --from 2026-11-25T18:30:00 --until 2026-11-25T18:40:00
    python -m monitor.report --run DIR --from -15min                  # ends now

Source: Graphite's render API (JSON) when it answers -- the URL given, else
HONGBAO_GRAPHITE_URL (``make smoke`` sets it when the stack is up), else
(command line only) the stack that ``python -m monitor.stack up`` started --
otherwise the run's own per-second records, ``DIR/seconds.jsonl``. Both sources are drawn by
the same code from the same table (monitor.views), so the graphs compare.
With Graphite, the report also saves graphite-web's own PNG of the QPS view
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
import html
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

from monitor.views import VIEWS, View, graphite_urls

log = logging.getLogger("hongbao.report")

GRAPHITE_SHIFT = 2.0  # seconds to subtract from a Graphite timestamp, see above
RECORDS = "seconds.jsonl"

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


def read_records(run_dir: Path) -> list[dict]:
    """The run's per-second records, oldest first ([] if there are none)."""
    path = Path(run_dir) / RECORDS
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a run killed mid-write leaves half a line
    return sorted((r for r in records if "t" in r), key=lambda r: r["t"])


def series_from_records(records: list[dict], view: View, start: float = -math.inf,
                        end: float = math.inf) -> dict[str, Points]:
    """{label: points} in [start, end] for the view's series whose key the records carry."""
    out: dict[str, Points] = {}
    for s in view.series:
        if s.key is None:
            continue
        points = []
        for r in records:
            value = r.get(s.key)
            if s.subkey is not None:
                value = value.get(s.subkey) if isinstance(value, dict) else None
            if isinstance(value, int | float) and not math.isnan(value):
                points.append((float(r["t"]), float(value)))
        if s.cumulative:  # a ledger total each second: draw what changed in that second
            deltas = [(t, v - before) for (_, before), (t, v) in itertools.pairwise(points)]
            if all(v >= 0 for _, v in deltas):  # else it was per-second after all
                points = deltas
        points = [(t, v) for t, v in points if start <= t <= end]
        if points:
            out[s.label] = points
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


def draw(view: View, series: dict[str, Points], path: Path, subtitle: str) -> None:
    """One PNG: the view's series over wall-clock time (UTC)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4), dpi=100)
    try:
        for label, points in series.items():
            xs = [dt.datetime.fromtimestamp(t, dt.UTC) for t, _ in points]
            style = "--" if label == "target" else "-"
            ax.plot(xs, [v for _, v in points], style, label=label, linewidth=1.4,
                    drawstyle="steps-post" if view.counts else "default")
        ax.set_title(f"{view.title}\n{subtitle}", fontsize=11)
        ax.set_ylabel(view.ylabel)
        ax.set_xlabel("time (UTC)")
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=dt.UTC))
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(loc="best", fontsize=9)
        fig.autofmt_xdate()
        fig.tight_layout()
        fig.savefig(path)
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


def write_html(run_dir: Path, drawn: list[Drawn], missing: list[View], source: str,
               start: int, end: int, extra: list[Path], links: dict[str, str]) -> Path:
    def when(t: float) -> str:
        return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    rows = []
    for d in drawn:
        for label in d.series:
            how = "total" if d.view.counts else "peak"
            rows.append(f"<tr><td>{html.escape(d.view.title)}</td><td>{html.escape(label)}</td>"
                        f"<td>{how}</td><td class=n>{d.summary(label):,.6g}</td></tr>")
    figures = []
    for d in drawn:
        link = links.get(d.view.name)
        live = f' &middot; <a href="{html.escape(link)}">in Graphite</a>' if link else ""
        figures.append(f'<figure><img src="{d.path.name}" alt="{html.escape(d.view.title)}">'
                       f"<figcaption>{html.escape(d.view.title)}{live}</figcaption></figure>")
    for path in extra:
        figures.append(f'<figure><img src="{path.name}" alt="graphite-web rendering">'
                       f"<figcaption>graphite-web's own rendering of the QPS view"
                       f"</figcaption></figure>")
    absent = ", ".join(html.escape(v.title) for v in missing) or "none"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>hongbao run {html.escape(run_dir.name)}</title>
<style>
 body {{ font: 14px/1.4 sans-serif; margin: 2em auto; max-width: 1040px; color: #222 }}
 table {{ border-collapse: collapse; margin: 1em 0 }}
 td, th {{ border-bottom: 1px solid #ddd; padding: 3px 10px; text-align: left }}
 td.n {{ text-align: right; font-variant-numeric: tabular-nums }}
 figure {{ margin: 1.5em 0 }} img {{ max-width: 100% }}
 figcaption {{ color: #555 }}
</style></head><body>
<h1>hongbao load test: {html.escape(run_dir.name)}</h1>
<p>{when(start)} &ndash; {when(end)} ({end - start} s). Source: {html.escape(source)}.
Graphs with no data in this window: {absent}.</p>
<table><tr><th>graph</th><th>series</th><th></th><th>value</th></tr>
{chr(10).join(rows)}
</table>
{chr(10).join(figures)}
</body></html>
"""
    path = run_dir / "index.html"
    path.write_text(page)
    return path


# -- the job -----------------------------------------------------------------------------


def build_report(run_dir: Path | str, graphite_url: str | None = None,
                 start: int | None = None, end: int | None = None) -> list[Drawn]:
    """Draw every view that has data; return what was drawn (write_report's worker)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    records = read_records(run_dir)
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
        source = str(run_dir / RECORDS)
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
        draw(view, series, path, f"{run_dir.name} · {source.split(';')[0]}")
        drawn.append(Drawn(view, path, series))
    extra = []
    links: dict[str, str] = {}
    if use_graphite:
        png = save_graphite_png(url, run_dir, start, end)
        extra = [png] if png else []
        links = graphite_urls(url, start - 2, end + 3)
    write_html(run_dir, drawn, missing, source, start, end, extra, links)
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
    args = parser.parse_args(argv)
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
