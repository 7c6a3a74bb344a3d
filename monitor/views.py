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
    # a running total that never stands still (CPU of live processes): a second that
    # repeats the last value repeats the last reading (at 1M the bench reads every ~2 s)
    sampled: bool = False
    per_item: bool = False  # one line per host: Graphite's per-host series, or the
    # record's {host: {subkey: value}}
    scale: float = 1.0  # record value times this (bytes -> MiB)
    dashed: bool = False  # a reference line (target, scheduled), not a measurement


@dataclass(frozen=True)
class View:
    name: str  # also the PNG's file name
    title: str
    ylabel: str
    series: tuple[Series, ...]
    counts: bool = True  # per-second counts (the summary sums them), else levels (max)
    hint: str = ""  # one line under the graph: what to look for


# 14 (an envelope) and 15 (none left) serve a SHAKE; 16 and 17 refuse it.
SERVED = f"sumSeries({C}.server.shakes.14.count,{C}.server.shakes.15.count)"
CLIENT_SERVED = f"sumSeries({C}.client.*.results.14.count,{C}.client.*.results.15.count)"
MIB = 1 / 2**20

VIEWS: tuple[View, ...] = (
    View("qps", "SHAKEs served per second", "requests per second", (
        Series("target", "", "target_qps", dashed=True),
        # The server counts a SHAKE in the second it handles it: by arrival.
        Series("server served", SERVED, "server_served"),
        Series("clients answered", CLIENT_SERVED, "client_served"),
        Series("scheduled (clients sent)", f"sumSeries({C}.client.*.sent.count)",
               "client_sent", dashed=True),
    ), hint="Served lines inside the green ±2% band each second; a dip then a spike is a "
            "backlog served late, however exact the dashed scheduled line is."),
    View("results", "Server answers per second, by result", "answers per second", (
        Series("14 got an envelope", f"{C}.server.shakes.14.count", "server_by_result", "14"),
        Series("15 none left", f"{C}.server.shakes.15.count", "server_by_result", "15"),
        Series("16 refused", f"{C}.server.shakes.16.count", "server_by_result", "16"),
        Series("17 overload", f"{C}.server.shakes.17.count", "server_by_result", "17"),
    ), hint="14 and 15 serve a request; any 16 (refused) or 17 (over the server's budget) "
            "is a request not served."),
    View("latency", "Client latency", "milliseconds", (
        Series("p50", f"averageSeries({G}.client.*.p*.latency_p50_ms)", "latency_p50_ms"),
        Series("p99", f"maxSeries({G}.client.*.p*.latency_p99_ms)", "latency_p99_ms"),
    ), counts=False, hint="p99 must stay under 100 ms through every loaded phase; a ramp "
                          "that keeps rising is a queue that is not draining."),
    View("server_health", "Server event-loop lag and GC pause (worst SET)", "milliseconds", (
        Series("loop lag", f"maxSeries({G}.server.set.*.loop_lag_ms)", "loop_lag_ms"),
        Series("GC pause", f"maxSeries({G}.server.set.*.gc_pause_ms)", "gc_pause_ms"),
    ), counts=False, hint="Worst SET in each second; above 10 ms every connection of that "
                          "SET waited that long."),
    View("connections", "Connections held at both ends", "connections", (
        Series("server", f"sumSeries({G}.server.set.*.connections)", "connections"),
        Series("clients", f"sumSeries({G}.client.*.p*.connections)", "client_connections"),
    ), counts=False, hint="Both lines flat at the run's connection count; a step down is "
                          "connections dropped."),
    View("cpu", "CPU used by the server and the clients", "cores busy", (
        Series("server", "", "server_cpu_seconds", cumulative=True, sampled=True),
        Series("clients", "", "client_cpu_seconds", cumulative=True, sampled=True),
    ), counts=False, hint="CPU seconds per second of each side's processes; a side near the "
                          "machine's core count has no room left."),
    View("memory", "Resident memory", "MiB", (
        Series("server", "", "server_rss_bytes", scale=MIB),
        Series("clients", "", "client_rss_bytes", scale=MIB),
    ), counts=False, hint="Flat while the load changes: memory follows connections, "
                          "not requests."),
    # One line per host (its interfaces summed): hosts simulated on one machine
    # each see that machine's interfaces, so a fleet-wide sum would count them twice.
    View("network", "Network packets per second per host (all interfaces)", "packets/s", (
        Series("in", f"aliasByNode(sumSeriesWithWildcards({G}.net.*.*.packets_in,5),4)",
               "net", "packets_in", per_item=True),
        Series("out", f"aliasByNode(sumSeriesWithWildcards({G}.net.*.*.packets_out,5),4)",
               "net", "packets_out", per_item=True),
    ), counts=False, hint="Packets through each host's interfaces; they follow the served rate, "
                          "and a flat line under rising load is a saturated link."),
    View("network_bytes", "Network bytes per second per host (all interfaces)", "MiB/s", (
        Series("in", f"aliasByNode(scale(sumSeriesWithWildcards({G}.net.*.*.bytes_in,5),"
                     f"{MIB!r}),4)", "net", "bytes_in", per_item=True, scale=MIB),
        Series("out", f"aliasByNode(scale(sumSeriesWithWildcards({G}.net.*.*.bytes_out,5),"
                      f"{MIB!r}),4)", "net", "bytes_out", per_item=True, scale=MIB),
    ), counts=False, hint="Bytes through each host's interfaces; frames are 16-36 bytes, so "
                          "most of this is TCP/IP headers."),
    View("envelopes", "Envelopes generated vs granted vs claimed", "envelopes per second", (
        Series("generated", f"{C}.server.envelopes.generated.count", "envelopes_generated",
               cumulative=True),
        # Like the ledger, envelopes.granted counts shake grants and claimed shares.
        Series("granted", f"{C}.server.envelopes.granted.count", "envelopes_granted",
               cumulative=True),
        Series("group claimed", f"{C}.server.claims.granted.count", "group_claimed",
               cumulative=True),
        Series("expired", f"{C}.server.envelopes.expired.count"),
    ), hint="Granted follows generated while shakers outnumber envelopes; a gap that grows "
            "is envelopes waiting."),
    View("amounts", "Amounts generated vs granted", "amount per second (cents)", (
        Series("generated", f"{C}.server.amount.generated.count", "amount_generated",
               cumulative=True),
        Series("granted", f"{C}.server.amount.granted.count", "amount_granted",
               cumulative=True),
        Series("expired", f"{C}.server.amount.expired.count"),
    ), hint="The money side of the ledger, per second; the totals are in the ledger above."),
)


# The views Graphite can draw: the others (CPU, memory) exist only in a run's records.
GRAPHITE_VIEWS: tuple[View, ...] = tuple(v for v in VIEWS if any(s.target for s in v.series))


def graphite_urls(graphite_url: str, since: str | int = "-15min",
                  until: str | int = "now") -> dict[str, str]:
    """graphite-web render URLs (PNG) for each view: the saved graphs, live or for a run."""
    urls = {}
    for view in GRAPHITE_VIEWS:
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
    for view in GRAPHITE_VIEWS:
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
