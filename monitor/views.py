"""The main views of a load test, in one table: Graphite targets and run-record keys.

Both the report (PNG from Graphite's JSON or from the run's own
``seconds.jsonl``) and the saved graphite-web URLs (``python -m
monitor.stack urls``) read this table, so a graph looks the same whichever
source drew it. Graphite names follow statsd's new namespace:
``stats.counters.<name>.count`` (events in that flush) and
``stats.gauges.<name>``; the names under ``hongbao.`` are in README.rst
"Metrics".
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

C = "stats.counters.hongbao"
G = "stats.gauges.hongbao"


@dataclass(frozen=True)
class Series:
    """One line: its label, its Graphite target, its key in seconds.jsonl."""

    label: str
    target: str  # "" : seconds.jsonl only
    key: str | None = None  # None: Graphite only
    subkey: str | None = None  # for dict-valued keys such as server_by_result
    cumulative: bool = False  # seconds.jsonl holds a running total (ledger snapshot)
    per_item: bool = False  # the target returns one series per host: one line each


@dataclass(frozen=True)
class View:
    name: str  # also the PNG's file name
    title: str
    ylabel: str
    series: tuple[Series, ...]
    counts: bool = True  # per-second counts (the summary sums them), else levels (max)


VIEWS: tuple[View, ...] = (
    View("qps", "Client QPS vs server QPS", "requests per second", (
        Series("client sent", f"sumSeries({C}.client.*.sent.count)", "client_sent"),
        Series("client answered", f"sumSeries({C}.client.*.answered.count)",
               "client_answered"),
        Series("server shakes", f"sumSeries({C}.server.shakes.*.count)", "server_shakes"),
        Series("target", "", "target_qps"),
    )),
    View("results", "Server shake results per second", "answers per second", (
        Series("14 got an envelope", f"{C}.server.shakes.14.count", "server_by_result", "14"),
        Series("15 none left", f"{C}.server.shakes.15.count", "server_by_result", "15"),
        Series("16 refused", f"{C}.server.shakes.16.count", "server_by_result", "16"),
        Series("17 overload", f"{C}.server.shakes.17.count", "server_by_result", "17"),
    )),
    View("connections", "Connections established", "connections", (
        Series("server", f"sumSeries({G}.server.set.*.connections)", "connections"),
        Series("clients", f"sumSeries({G}.client.*.p*.connections)"),
    ), counts=False),
    View("envelopes", "Envelopes generated vs granted vs claimed", "envelopes per second", (
        Series("generated", f"{C}.server.envelopes.generated.count", "envelopes_generated",
               cumulative=True),
        # Like the ledger, envelopes.granted counts shake grants and claimed shares.
        Series("granted", f"{C}.server.envelopes.granted.count", "envelopes_granted",
               cumulative=True),
        Series("group claimed", f"{C}.server.claims.granted.count", "group_claimed",
               cumulative=True),
        Series("expired", f"{C}.server.envelopes.expired.count"),
    )),
    View("amounts", "Amounts generated vs granted", "amount per second", (
        Series("generated", f"{C}.server.amount.generated.count", "amount_generated",
               cumulative=True),
        Series("granted", f"{C}.server.amount.granted.count", "amount_granted",
               cumulative=True),
        Series("expired", f"{C}.server.amount.expired.count"),
    )),
    # One line per host (its interfaces summed): hosts simulated on one machine
    # each see that machine's interfaces, so a fleet-wide sum would count them twice.
    View("network", "Network packets per second per host (all interfaces)", "packets/s", (
        Series("in", f"aliasByNode(sumSeriesWithWildcards({G}.net.*.*.packets_in,5),4)",
               per_item=True),
        Series("out", f"aliasByNode(sumSeriesWithWildcards({G}.net.*.*.packets_out,5),4)",
               per_item=True),
        Series("packets", "", "net_pps"),
    ), counts=False),
    View("latency", "Client latency", "milliseconds", (
        Series("p50", f"averageSeries({G}.client.*.p*.latency_p50_ms)", "latency_p50_ms"),
        Series("p99", f"maxSeries({G}.client.*.p*.latency_p99_ms)", "latency_p99_ms"),
    ), counts=False),
    View("server_health", "Server event-loop lag and GC pause (worst SET)", "milliseconds", (
        Series("loop lag", f"maxSeries({G}.server.set.*.loop_lag_ms)"),
        Series("GC pause", f"maxSeries({G}.server.set.*.gc_pause_ms)"),
    ), counts=False),
)


def graphite_urls(graphite_url: str, since: str | int = "-15min",
                  until: str | int = "now") -> dict[str, str]:
    """graphite-web render URLs (PNG) for each view: the saved graphs, live or for a run."""
    urls = {}
    for view in VIEWS:
        params: list[tuple[str, str]] = [
            ("target", _labelled(s)) for s in view.series if s.target]
        params += [("from", str(since)), ("until", str(until)), ("title", view.title),
                   ("vtitle", view.ylabel), ("width", "900"), ("height", "350"), ("tz", "UTC")]
        urls[view.name] = f"{graphite_url}/render?{urllib.parse.urlencode(params)}"
    return urls


def dashboard_state(name: str = "hongbao", minutes: int = 15) -> dict:
    """A graphite-web dashboard (its /dashboard/save state) with one graph per view.

    ``python -m monitor.stack up`` saves it, so ``/dashboard/hongbao`` shows
    the main views live, refreshed every 5 s.
    """
    graphs = []
    for view in VIEWS:
        targets = [_labelled(s) for s in view.series if s.target]
        params = {"target": targets, "title": view.title, "vtitle": view.ylabel}
        query = urllib.parse.urlencode([("target", t) for t in targets]
                                       + [("title", view.title), ("vtitle", view.ylabel)])
        graphs.append([view.name, params, f"/render?{query}"])
    return {
        "name": name,
        "timeConfig": {"type": "relative", "relativeStartQuantity": str(minutes),
                       "relativeStartUnits": "minutes", "relativeUntilQuantity": "",
                       "relativeUntilUnits": "now", "startDate": "", "startTime": "",
                       "endDate": "", "endTime": ""},
        "refreshConfig": {"enabled": True, "interval": 5000},
        "graphSize": {"width": 500, "height": 280},
        "defaultGraphParams": {"from": f"-{minutes}minutes", "until": "now", "width": 500,
                               "height": 280, "tz": "UTC"},
        "graphs": graphs,
    }


def _labelled(s: Series) -> str:
    """The target with its legend label (per-item series keep their host name)."""
    if s.per_item:
        return f"aliasSub({s.target},'^(.*)$','\\1 {s.label}')"
    return f"alias({s.target},'{s.label}')"
