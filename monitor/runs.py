"""One run directory as the report reads it: its verdict, its phases, its per-second records.

A smoke run writes ``summary.json``, the scale bench ``result.json``; both carry
the same per-phase rows (``app.local.summary.phase_summary``) and both write
``seconds.jsonl``. This module hides the difference from the pages.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECORDS = "seconds.jsonl"
SERIES_KEY = "hongbao-series"  # PNG text chunk with the points a graph shows
SUMMARIES = ("summary.json", "result.json")  # smoke run, scale bench


@dataclass
class PhaseSpan:
    name: str
    target: int
    start: int  # first unix second
    end: int  # first second after it


@dataclass
class Run:
    """What a run directory holds; ``summary`` is {} for a directory with records only."""

    path: Path
    summary: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    spans: list[PhaseSpan] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def phases(self) -> list[dict[str, Any]]:
        return self.summary.get("phases", [])

    @property
    def passed(self) -> bool | None:
        return self.summary.get("passed")


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


def read_summary(run_dir: Path) -> dict[str, Any]:
    for name in SUMMARIES:
        path = Path(run_dir) / name
        if path.exists():
            return json.loads(path.read_text())
    return {}


def spans_of(summary: dict[str, Any], records: list[dict]) -> list[PhaseSpan]:
    """The phases' seconds: the smoke's plan, else runs of equal target in the records.

    The records of both kinds of run start at the first phase's first second and
    end with the last phase, so a change of target is a change of phase.
    """
    plan = summary.get("phase_plan")
    if plan:
        return [PhaseSpan(p["name"], p["target"], p["start"], p["end"]) for p in plan]
    names = [p["phase"] for p in summary.get("phases", [])]
    spans: list[PhaseSpan] = []
    for r in records:
        target = r.get("target_qps", 0)
        if spans and spans[-1].target == target and spans[-1].end == r["t"]:
            spans[-1].end = r["t"] + 1
        else:
            name = names[len(spans)] if len(spans) < len(names) else f"{target:,}/s"
            spans.append(PhaseSpan(name, target, r["t"], r["t"] + 1))
    return spans


def load_run(run_dir: Path | str) -> Run:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory {run_dir}")
    summary = read_summary(run_dir)
    records = read_records(run_dir)
    return Run(run_dir, summary, records, spans_of(summary, records))


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and not math.isnan(value)


def save_png(fig: Any, path: Path, series: dict[str, Any]) -> None:
    """Save a matplotlib figure with the points it shows in the PNG (``hongbao-series``).

    So a check can hold the picture itself against the run's records.
    """
    data = {label: [[t, v] for t, v in points] for label, points in series.items()}
    fig.savefig(path, metadata={SERIES_KEY: json.dumps(data, separators=(",", ":"))})


def drawn_series(path: Path) -> dict[str, list[tuple[float, float]]]:
    """The points a PNG written by save_png() shows, read back from the file."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.text.get(SERIES_KEY)
    if text is None:
        raise ValueError(f"{path} carries no {SERIES_KEY} chunk")
    return {label: [(t, v) for t, v in points] for label, points in json.loads(text).items()}
