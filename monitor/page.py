"""The run's page, ``index.html``: the verdict first, then the graphs, each with what to look for.

Order of the page: PASS/FAIL and the reasons; the per-phase table with the
terminal summary's figures (rates by what was served in each second); the
scheduled check; the ledger equation; the run's settings; then one graph a
view. Every figure comes from the run directory (``summary.json`` or
``result.json``, ``seconds.jsonl``), every path is relative to it, and the page
loads nothing from the network, so a copied directory opens anywhere.
"""

from __future__ import annotations

import datetime as dt
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitor import numbers as fmt
from monitor.runs import Run
from monitor.views import View

STYLE = """
 body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1080px; color: #222;
        padding: 0 1em }
 h1 { font-size: 1.5em; margin-bottom: .2em } h2 { font-size: 1.15em; margin-top: 2em }
 .verdict { font-size: 1.6em; font-weight: 700; padding: .2em .6em; border-radius: 4px;
            display: inline-block; color: #fff }
 .PASS { background: #1a7f37 } .FAIL { background: #c62828 } .NONE { background: #777 }
 ul.reasons li { color: #c62828 }
 table { border-collapse: collapse; margin: .6em 0; font-size: 13px }
 td, th { border-bottom: 1px solid #ddd; padding: 3px 9px; text-align: left;
          vertical-align: top }
 th { background: #f4f4f4; font-weight: 600 }
 td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap }
 td.bad { color: #c62828; font-weight: 600 } td.ok { color: #1a7f37 }
 .better { color: #1a7f37; font-weight: 600 } .worse { color: #c62828; font-weight: 600 }
 figure { margin: 1.2em 0 2em } img { max-width: 100%; display: block }
 figcaption, .note { color: #555 }
 code { background: #f4f4f4; padding: 0 .2em }
 .wide { overflow-x: auto }
 .side { display: flex; flex-wrap: wrap; gap: 0 2em } .side h3 { margin-bottom: 0 }
"""


@dataclass
class Graphs:
    """What the report drew: (view, PNG file name) in page order, and what it could not."""

    drawn: list[tuple[View, str]]
    missing: list[View]
    extra: list[str]  # graphite-web's own PNG, when Graphite was the source
    links: dict[str, str]  # view name -> graphite-web render URL
    source: str
    start: int
    end: int


def esc(value: Any) -> str:
    return html.escape(str(value))


def when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def document(title: str, body: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f"<title>{esc(title)}</title>\n<style>{STYLE}</style></head><body>\n"
            f"{body}\n</body></html>\n")


def verdict_block(run: Run) -> str:
    passed = run.passed
    word = "NONE" if passed is None else "PASS" if passed else "FAIL"
    text = "no verdict (no summary.json or result.json)" if passed is None else word
    reasons = run.summary.get("reasons", [])
    items = "".join(f"<li>{esc(r)}</li>" for r in reasons)
    stopped = run.summary.get("stopped_by")
    note = f'<p class="note">stopped by: {esc(stopped)}</p>' if stopped else ""
    return (f'<p><span class="verdict {word}" id="verdict">{esc(text)}</span></p>\n'
            + (f'<ul class="reasons" id="reasons">{items}</ul>\n' if items else "") + note)


# (heading, the phase row's key, how to print it): the terminal's figures, in two tables
SERVED_COLUMNS: tuple[tuple[str, str | None, Any], ...] = (
    ("phase", "phase", esc),
    ("target /s", "target", fmt.count),
    ("server served /s", "server_qps", fmt.count),
    ("clients answered /s", "client_qps", fmt.count),
    ("server ±2%", "server_within", fmt.share),
    ("clients ±2%", "client_within", fmt.share),
    ("p50", "latency_p50_ms", fmt.ms),
    ("p99", "latency_p99_ms", fmt.ms),
    ("scheduled: counted / sent", None, None),
)
COST_COLUMNS: tuple[tuple[str, str | None, Any], ...] = (
    ("phase", "phase", esc),
    ("generated", "generated", fmt.count),
    ("granted", "granted", fmt.count),
    ("claimed", "claimed", fmt.count),
    ("client CPU/req", "cpu_us_per_request", fmt.micros),  # smoke: the agents' own figure
    ("client CPU/req", "client_cpu_us_per_request", fmt.micros),  # scale bench
    ("server CPU/req", "server_cpu_us_per_request", fmt.micros),
    ("machine CPU", "machine_cpu_percent", lambda x: "-" if x is None else f"{x:.0f}%"),
    ("CPU vs floor", "floor_ratio", lambda x: "-" if x is None else f"{x:.2f}×"),
    ("server RSS/conn", "server_bytes_per_connection", fmt.size),
    ("client RSS/conn", "client_bytes_per_connection", fmt.size),
    ("loop lag", "loop_lag_max_ms", fmt.ms),
    ("GC pause", "gc_pause_max_ms", fmt.ms),
)


def phase_cell(row: dict[str, Any], key: str | None, show: Any) -> str:
    """One <td>: right-aligned figures, a failing figure marked."""
    if key is None:  # the scheduled check: every request sent was counted
        counted, sent = row.get("scheduled_counted"), row.get("scheduled_sent")
        cls = "n" if counted is None or not row.get("target") else (
            "n ok" if counted == sent else "n bad")
        return f'<td class="{cls}">{fmt.count(counted)} / {fmt.count(sent)}</td>'
    value = row.get(key)
    cls = "" if key == "phase" else "n"
    if row.get("target") and key in ("server_within", "client_within") and value is not None:
        cls += " ok" if value >= 0.95 else " bad"
    if row.get("target") and key == "latency_p99_ms" and value is not None:
        cls += " ok" if value < 100 else " bad"
    return f'<td class="{cls.strip()}">{show(value)}</td>'


def phase_table(rows: list[dict[str, Any]], table: tuple, table_id: str) -> str:
    """A per-phase table; only the columns the run has figures for."""
    columns = [c for c in table
               if c[1] is None and any("scheduled_sent" in r for r in rows)
               or c[1] is not None and any(r.get(c[1]) is not None for r in rows)]
    head = "".join(f'<th class="{"" if key == "phase" else "n"}">{esc(h)}</th>'
                   for h, key, _ in columns)
    body = "\n".join("<tr>" + "".join(phase_cell(r, key, show) for _, key, show in columns)
                     + "</tr>" for r in rows)
    return f'<div class="wide"><table id="{table_id}"><tr>{head}</tr>\n{body}\n</table></div>'


def ledger_block(summary: dict[str, Any]) -> str:
    led = summary.get("ledger")
    if not led:
        return ""

    def part(name: str) -> str:
        v = led.get(name) or {}
        return (f'{name} <b>{fmt.count(v.get("count", 0))}</b> '
                f'({fmt.money(v.get("amount", 0))})')

    state = "balanced" if led.get("balanced") else "NOT balanced"
    return (f'<p id="ledger">{part("generated")} = {part("granted")} + {part("waiting")} + '
            f'{part("expired")}: <b class="{"better" if led.get("balanced") else "worse"}">'
            f"{state}</b></p>")


def settings_block(run: Run) -> str:
    s = run.summary
    rows: list[tuple[str, str]] = []
    if "peak_qps" in s:  # the smoke run
        rows += [("connections", fmt.count(s.get("connections"))),
                 ("simulated client hosts", fmt.count(s.get("hosts"))),
                 ("server SETs", fmt.count(s.get("sets"))),
                 ("peak rate", f"{fmt.count(s.get('peak_qps'))} /s (phases 30% and 60%)"),
                 ("pacing", esc(s.get("pacing"))),
                 ("logged in in", fmt.seconds(s.get("login_seconds"))),
                 ("whole run", fmt.seconds(s.get("elapsed_seconds"))),
                 ("clock offset to the server, per host",
                  ", ".join(fmt.ms(x) for x in s.get("clock_offset_ms", [])) or "-")]
    elif "target_connections" in s:  # the scale bench
        held = s.get("held", {})
        bpc = s.get("bytes_per_connection", {})
        rows += [("connections (target / logged in)",
                  f"{fmt.count(s.get('target_connections'))} / {fmt.count(s.get('connected'))}"),
                 ("simulated client hosts", fmt.count(s.get("hosts"))),
                 ("server SETs", fmt.count(s.get("sets"))),
                 ("phases", ", ".join(f"{fmt.count(q)} /s" for q in s.get("phases_planned", []))),
                 ("logged in in", fmt.seconds(s.get("login_seconds"))),
                 ("held, dropped", f"{fmt.seconds(held.get('seconds'))}, "
                                   f"{fmt.count(held.get('dropped'))} dropped"),
                 ("bytes per connection", f"server {fmt.size(bpc.get('server_user'))}, clients "
                                          f"{fmt.size(bpc.get('client_user'))}, kernel "
                                          f"{fmt.size(bpc.get('kernel_pair'))} a pair")]
        ramp = s.get("ramp")
        if ramp:
            def rate(x: int | None) -> str:
                return "none" if x is None else f"{fmt.count(x)} /s"

            rows.append(("ramp", f"+{fmt.count(ramp.get('step'))} /s a step: highest passing "
                                 f"{rate(ramp.get('highest_passing'))}, first failing "
                                 f"{rate(ramp.get('first_failing'))}"))
        floor = s.get("floor")
        if floor:
            rows.append(("floor (same traffic, same run)", esc(floor.get("kind"))))
    group = s.get("group")
    if group:
        rows.append(("group envelopes", ", ".join(f"{k} {fmt.count(v)}"
                                                  for k, v in group.items())))
    body = "\n".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table id="settings">\n{body}\n</table>' if rows else ""


def figures(graphs: Graphs) -> str:
    out = []
    for view, png in graphs.drawn:
        link = graphs.links.get(view.name)
        live = f' <a href="{esc(link)}">Live in Graphite.</a>' if link else ""
        out.append(f'<figure id="graph-{esc(view.name)}"><img src="{esc(png)}" '
                   f'alt="{esc(view.title)}"><figcaption>{esc(view.hint)}{live}'
                   f"</figcaption></figure>")
    for png in graphs.extra:
        out.append(f'<figure><img src="{esc(png)}" alt="graphite-web rendering of the served '
                   f'rate"><figcaption>The same served rate as graphite-web draws it.'
                   f"</figcaption></figure>")
    return "\n".join(out)


def write_page(run: Run, graphs: Graphs) -> Path:
    """Write ``index.html`` into the run directory and return its path."""
    s = run.summary
    kind = "scale bench" if "target_connections" in s else "smoke run" if s else "run"
    absent = ", ".join(esc(v.title) for v in graphs.missing)
    body = [
        f"<h1>hongbao {kind} {esc(run.name)}</h1>",
        f'<p class="note">{when(graphs.start)} &ndash; {when(graphs.end)} '
        f"({graphs.end - graphs.start + 1:,} s)</p>",
        verdict_block(run),
        "<h2>Phases</h2>" if run.phases else "",
        '<p class="note">Rates are what was served in each second: answered with 14 or 15 by '
        "the server in the second the request arrived, and received by the clients in that "
        "second. ±2% is the share of steady seconds (all but the first) within ±2% of the "
        "target; a phase passes with ≥ 95% at both ends and p99 under 100 ms. Scheduled: "
        "requests the clients sent in the phase, and how many of them the server counted by "
        "the second stamped in each frame.</p>" if run.phases else "",
        phase_table(run.phases, SERVED_COLUMNS, "phases") if run.phases else "",
        phase_table(run.phases, COST_COLUMNS, "costs") if run.phases else "",
        "<h2>Ledger</h2>" if s.get("ledger") else "", ledger_block(s),
        "<h2>Run</h2>" if s else "", settings_block(run),
        "<h2>Graphs</h2>",
        f'<p class="note">Drawn from {esc(graphs.source)}; loaded phases shaded.'
        + (f" No data for: {absent}." if absent else "") + "</p>",
        figures(graphs),
    ]
    path = run.path / "index.html"
    path.write_text(document(f"hongbao {run.name}", "\n".join(b for b in body if b)))
    return path
