"""Two runs on one page: "better or worse than last time, and where?".

Run it::

    python -m monitor.report --compare runs/A runs/B            # writes runs/compare-A-vs-B/
    python -m monitor.report --compare runs/A runs/B --out DIR

The page shows both verdicts, then per phase (matched by position: the first
phase of A with the first of B, ...) both runs' figures side by side with the
change from A to B, coloured green where B is better and red where it is
worse, then graphs of both runs overlaid, one panel per loaded phase, on a
time axis that starts at each phase's first second. Like a run's page it
needs only its own directory and the two runs' (linked by relative paths).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitor import numbers as fmt
from monitor.page import document, esc, verdict_block
from monitor.runs import PhaseSpan, Run, finite, load_run, save_png


@dataclass(frozen=True)
class Figure:
    """One compared figure of a phase row: which way is better."""

    label: str
    key: str
    show: Any  # formatter
    better: str  # "higher", "lower" or "" (not judged)


FIGURES: tuple[Figure, ...] = (
    Figure("target /s", "target", fmt.count, ""),
    Figure("server served /s", "server_qps", fmt.count, "higher"),
    Figure("clients answered /s", "client_qps", fmt.count, "higher"),
    Figure("server ±2%", "server_within", fmt.share, "higher"),
    Figure("clients ±2%", "client_within", fmt.share, "higher"),
    Figure("p50", "latency_p50_ms", fmt.ms, "lower"),
    Figure("p99", "latency_p99_ms", fmt.ms, "lower"),
    Figure("client CPU/req", "cpu_us_per_request", fmt.micros, "lower"),  # smoke
    Figure("client CPU/req", "client_cpu_us_per_request", fmt.micros, "lower"),  # scale bench
    Figure("server CPU/req", "server_cpu_us_per_request", fmt.micros, "lower"),
    Figure("server RSS/conn", "server_bytes_per_connection", fmt.size, "lower"),
    Figure("client RSS/conn", "client_bytes_per_connection", fmt.size, "lower"),
    Figure("loop lag", "loop_lag_max_ms", fmt.ms, "lower"),
    Figure("GC pause", "gc_pause_max_ms", fmt.ms, "lower"),
)

# (file, title, y label, record key, scale): the graphs overlaid per phase
OVERLAYS: tuple[tuple[str, str, str, str, float], ...] = (
    ("compare-served.png", "Served per second by the server (arrival)", "requests/s",
     "server_served", 1.0),
    ("compare-p99.png", "Client latency p99", "ms", "latency_p99_ms", 1.0),
    ("compare-server-cpu.png", "Server CPU", "cores busy", "server_cpu_seconds", 1.0),
    ("compare-client-cpu.png", "Client CPU", "cores busy", "client_cpu_seconds", 1.0),
)
CUMULATIVE = {"server_cpu_seconds", "client_cpu_seconds"}
SAME = 0.01  # a change under 1% is not coloured: run-to-run noise is larger


def delta(figure: Figure, a: Any, b: Any) -> dict[str, Any]:
    """B - A, relative change, and whether that is better, worse or the same."""
    if not (finite(a) and finite(b)):
        return {"delta": None, "relative": None, "verdict": ""}
    change = b - a
    relative = change / a if a else None
    small = change == 0 or (relative is not None and abs(relative) < SAME)
    verdict = "same" if small or not figure.better else (
        "better" if (change > 0) == (figure.better == "higher") else "worse")
    return {"delta": round(change, 6), "relative": relative,
            "verdict": verdict if figure.better else ""}


def shown_delta(figure: Figure, d: dict[str, Any]) -> str:
    if d["delta"] is None:
        return "-"
    if figure.key.endswith("_within"):  # shares: the change in points
        return f"{100 * d['delta']:+.1f} pt"
    sign = "+" if d["delta"] > 0 else "-" if d["delta"] < 0 else "±"
    text = sign + figure.show(abs(d["delta"]))
    if d["relative"] is None:
        return text
    pct = round(100 * d["relative"], 1)
    return text + (f" ({pct:+.1f}%)" if pct else " (±0.0%)")


def compare_rows(a: Run, b: Run) -> list[dict[str, Any]]:
    """Per matched phase, each figure of A and B and the delta."""
    out = []
    for row_a, row_b in zip(a.phases, b.phases, strict=False):
        figures = []
        for f in FIGURES:
            va, vb = row_a.get(f.key), row_b.get(f.key)
            if va is None and vb is None:
                continue
            figures.append({"label": f.label, "key": f.key, "a": va, "b": vb, **delta(f, va, vb)})
        out.append({"phase_a": row_a["phase"], "phase_b": row_b["phase"], "figures": figures})
    return out


def rows_html(rows: list[dict[str, Any]]) -> str:
    by_key = {f.key: f for f in FIGURES}
    parts = []
    for i, phase in enumerate(rows):
        name = phase["phase_a"] if phase["phase_a"] == phase["phase_b"] else \
            f"{phase['phase_a']} / {phase['phase_b']}"
        body = []
        for fig in phase["figures"]:
            f = by_key[fig["key"]]
            cls = f' class="n {fig["verdict"]}"' if fig["verdict"] else ' class="n"'
            body.append(f'<tr data-key="{esc(f.key)}"><th>{esc(f.label)}</th>'
                        f'<td class="n">{f.show(fig["a"])}</td><td class="n">{f.show(fig["b"])}'
                        f"</td><td{cls}>{shown_delta(f, fig)}</td></tr>")
        head = '<tr><th></th><th class="n">A</th><th class="n">B</th><th class="n">B &minus; A'
        parts.append(f'<div><h3>phase {esc(name)}</h3>\n<table id="phase-{i}">{head}</th>'
                     "</tr>\n" + "\n".join(body) + "\n</table></div>")
    return "\n".join(parts)


def phase_points(run: Run, span: PhaseSpan, key: str, scale: float) -> list[tuple[float, float]]:
    """(seconds since the phase's start, value) of one record key within the phase."""
    rows = [r for r in run.records if span.start <= r["t"] < span.end and finite(r.get(key))]
    if key in CUMULATIVE:  # totals: what changed from each second to the next
        return [(float(r["t"] - span.start), round((n[key] - r[key]) * scale, 6))
                for r, n in zip(rows, rows[1:], strict=False) if n["t"] == r["t"] + 1]
    return [(float(r["t"] - span.start), r[key] * scale) for r in rows]


def draw_overlays(a: Run, b: Run, out: Path) -> list[tuple[str, str]]:
    """The overlaid graphs; returns [(file name, title)] of those drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [(sa, sb) for sa, sb in zip(a.spans, b.spans, strict=False)
             if sa.target or sb.target]
    drawn = []
    for name, title, ylabel, key, scale in OVERLAYS:
        panels = [{"A": phase_points(a, sa, key, scale), "B": phase_points(b, sb, key, scale)}
                  for sa, sb in pairs]
        if not pairs or not any(p["A"] or p["B"] for p in panels):
            continue
        fig, axes = plt.subplots(1, len(pairs), figsize=(10, 3.4), dpi=100, squeeze=False)
        try:
            for ax, (sa, sb), lines in zip(axes[0], pairs, panels, strict=True):
                for label, points in lines.items():
                    ax.plot([t for t, _ in points], [v for _, v in points], label=label,
                            linewidth=1.5, drawstyle="steps-post" if key == "server_served"
                            else "default")
                if key == "server_served":
                    for span in (sa, sb):
                        ax.axhline(span.target, linestyle="--", linewidth=0.9, color="#888")
                phase = sa.name if sa.name == sb.name else f"{sa.name} / {sb.name}"
                ax.set_title(f"phase {phase}", fontsize=10)
                ax.set_xlabel("seconds since the phase's start")
                ax.grid(True, alpha=0.3)
                ax.set_ylim(bottom=0)
            for ax in axes[0]:
                ax.set_ylabel(ylabel)
            axes[0][-1].legend(loc="best", fontsize=9)
            fig.suptitle(f"{title}: A {a.name}, B {b.name}", fontsize=11)
            fig.tight_layout()
            data = {f"{i}/{label}": [[t, v] for t, v in points]
                    for i, lines in enumerate(panels) for label, points in lines.items()}
            save_png(fig, out / name, data)
        finally:
            plt.close(fig)
        drawn.append((name, title))
    return drawn


def write_compare(run_a: Path | str, run_b: Path | str, out: Path | str | None = None) -> Path:
    """Write the comparison page (``index.html``, its PNGs, ``compare.json``); return the page."""
    a, b = load_run(run_a), load_run(run_b)
    out = Path(out) if out is not None else a.path.parent / f"compare-{a.name}-vs-{b.name}"
    out.mkdir(parents=True, exist_ok=True)
    rows = compare_rows(a, b)
    graphs = draw_overlays(a, b, out)

    def link(run: Run, label: str) -> str:
        rel = os.path.relpath(run.path / "index.html", out)
        page = f' (<a href="{esc(rel)}">its page</a>)' if (run.path / "index.html").exists() \
            else ""
        return f"<h2>{label}: {esc(run.name)}{page}</h2>\n{verdict_block(run)}"

    figures = "\n".join(f'<figure><img src="{esc(n)}" alt="{esc(t)}"><figcaption>{esc(t)}: A '
                        f"and B from each phase's first second; a gap between the lines in the "
                        f"same phase is the change.</figcaption></figure>" for n, t in graphs)
    body = "\n".join([
        f"<h1>hongbao runs compared: A {esc(a.name)}, B {esc(b.name)}</h1>",
        link(a, "A"), link(b, "B"),
        "<h2>Phases, A against B</h2>",
        '<p class="note">Phases are matched by position. Green: B is better (a higher '
        "served rate or share within ±2%, lower latency, CPU or memory per connection); red: "
        "worse. Shares change in percentage points.</p>",
        f'<div class="side">{rows_html(rows)}</div>', "<h2>Graphs</h2>", figures])
    (out / "compare.json").write_text(json.dumps({
        "a": str(os.path.relpath(a.path, out)), "b": str(os.path.relpath(b.path, out)),
        "phases": rows, "graphs": [n for n, _ in graphs]}, indent=1) + "\n")
    page = out / "index.html"
    page.write_text(document(f"hongbao {a.name} vs {b.name}", body))
    return page
