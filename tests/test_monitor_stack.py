"""The real stack (node statsd -> carbon/whisper -> graphite-web) on free loopback ports.

The module fixture installs the stack from the project's own files if it is
missing (``monitor/requirements.txt``, ``monitor/package-lock.json``), starts
it in a temporary directory with short retention, and stops every daemon by
its process group at the end, also when a test fails. Under ``CI=true`` a
stack that cannot be installed fails the tests instead of skipping them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gevent
import pytest

from app.metrics.statsd import Metrics
from monitor import report
from monitor.stack import Ports, Stack, StackError, fetch_series
from tests.reliability import AgentProcess
from tests.serverproc import ROOT, ServerProcess

pytestmark = pytest.mark.monitor

C = "stats.counters.hongbao"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitor")
    st = Stack(root=root, ports=Ports.free(), retentions="1s:30m,10s:1d")
    try:
        st.install()
    except StackError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"monitor stack not installable in CI: {exc}")
        pytest.skip(f"monitor stack not installable here: {exc}")
    t0 = time.monotonic()
    st.up(timeout=30)  # stops whatever it started if it fails
    st.startup_seconds = time.monotonic() - t0
    try:
        yield st
    finally:
        st.down()
        for pid in (st.pids or {}).values():
            assert not Path(f"/proc/{pid}").exists() or b"zombie" in Path(
                f"/proc/{pid}/status").read_bytes().lower(), f"pid {pid} survived down()"


def graphite_sum(stack: Stack, target: str, start: int, end: int) -> float:
    total = 0.0
    for series in fetch_series(stack.graphite_url, target, start, end):
        total += sum(v for v, _ in series["datapoints"] if v is not None)
    return total


def wait_for_sums(stack: Stack, expected: dict[str, float], start: int, end_slack: int = 8,
                  timeout: float = 15.0) -> dict[str, float]:
    """Poll Graphite until every target sums to its expected value (or time runs out).

    The last second reaches Graphite up to ~2.5 s after it happened (flush at
    the half second, statsd's flush at the whole second, carbon's cache).
    """
    deadline = time.monotonic() + timeout
    while True:
        end = int(time.time()) + end_slack
        got = {t: graphite_sum(stack, t, start, end) for t in expected}
        if got == expected or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def test_stack_starts_fast_and_renders_png_and_json(stack):
    assert stack.startup_seconds < 30
    assert all(s["answers"] for s in stack.status().values()), stack.status()
    with urllib.request.urlopen(
            f"{stack.graphite_url}/render?target=constantLine(7)&from=-5min&width=300"
            "&height=150", timeout=10) as resp:
        assert resp.headers["Content-Type"] == "image/png"
        assert resp.read().startswith(b"\x89PNG")
    data = fetch_series(stack.graphite_url, "constantLine(7)", int(time.time()) - 60,
                        int(time.time()))
    assert {v for v, _ in data[0]["datapoints"]} == {7}


def test_counters_from_several_processes_sum_exactly(stack):
    """Four 'SETs' count 20,000 events a second between them; Graphite holds every one."""
    start = int(time.time()) - 1
    sets = [Metrics("hongbao.test.exact", stack.statsd_address) for _ in range(4)]
    sent = {"shakes.14": 0, "shakes.15": 0}

    def load(m: Metrics, k: int) -> None:
        until = time.time() + 4.0
        while time.time() < until:
            m.incr("shakes.14", 50)
            m.incr("shakes.15", 7 + k)
            sent["shakes.14"] += 50
            sent["shakes.15"] += 7 + k
            m.gauge(f"set.{k}.connections", 1000 + k)
            gevent.sleep(0.01)

    for m in sets:
        m.start()
    gevent.joinall([gevent.spawn(load, m, k) for k, m in enumerate(sets)])
    for m in sets:
        m.stop()
    expected = {f"stats.counters.hongbao.test.exact.{name}.count": float(n)
                for name, n in sent.items()}
    assert wait_for_sums(stack, expected, start) == expected
    gauges = fetch_series(stack.graphite_url, "stats.gauges.hongbao.test.exact.set.*.connections",
                          start, int(time.time()) + 2)
    assert sorted(max(v for v, _ in s["datapoints"] if v is not None) for s in gauges) == [
        1000, 1001, 1002, 1003]


def test_real_load_graphite_matches_server_counts_and_report_draws_it(stack, tmp_path):
    """Server + client agent under a short load: Graphite's sums equal the server's counts."""
    start = int(time.time()) - 1
    server = ServerProcess(tmp_path / "journal", sets=2,
                           extra=["--statsd", stack.statsd_address])
    client = None
    try:
        server.start()
        server.get("/yaohongbao?qps=100&sum=300")  # 300 shake envelopes over 3 s
        server.get("/fahongbao?qps=10&sum=20&min=1&max=2000")  # 20 groups of 3 shares
        client = AgentProcess(tmp_path / "agent.log", server.port, (1, 2000), qps=1000,
                              server_control=f"127.0.0.1:{server.control_port}",
                              host_name="e2e", statsd=stack.statsd_address).start()
        time.sleep(6)
        client.get("/qps?qps=0")
        time.sleep(2.5)  # the last answers and claims arrive; the agent closes its seconds
        client_totals = client.get("/stats")["totals"]
        stats = server.stats()
        by_result = {code: 0 for code in ("14", "15", "16", "17")}
        for second in stats["per_second"]:
            for code, n in second["by_result"].items():
                by_result[code] += n
        ledger = stats["ledger"]
        expected = {f"{C}.server.shakes.{code}.count": float(n)
                    for code, n in by_result.items() if n}
        expected[f"{C}.server.logins.count"] = float(stats["counters"]["logins"])
        expected[f"{C}.server.envelopes.generated.count"] = float(ledger["generated"]["count"])
        expected[f"{C}.server.amount.generated.count"] = float(ledger["generated"]["amount"])
        expected[f"{C}.server.claims.granted.count"] = float(
            stats["counters"].get("claims.granted", 0))
        assert sum(by_result.values()) >= 4000, by_result  # the load really ran
        assert ledger["generated"]["count"] > 0, ledger
        got = wait_for_sums(stack, expected, start)
        assert got == expected
        assert client_totals["sent"] == sum(by_result.values())
        client_expected = {f"{C}.client.e2e.{name}.count": float(client_totals[key])
                           for name, key in (("sent", "sent"), ("answered", "answered"),
                                             ("logins", "logins"))}
        assert wait_for_sums(stack, client_expected, start) == client_expected
    finally:
        if client is not None:
            client.stop()
        server.stop()
    end = int(time.time())

    run_dir = tmp_path / "run"
    paths = report.write_report(run_dir, stack.graphite_url, start, end)
    assert paths[-1].name == "index.html"
    for path in paths[:-1]:
        assert path.stat().st_size > 5000 and path.read_bytes().startswith(b"\x89PNG"), path
    summary = json.loads((run_dir / "report.json").read_text())
    assert summary["source"].startswith("Graphite")
    graphs = summary["graphs"]
    assert {"qps", "results", "connections", "envelopes", "amounts", "latency",
            "network", "server_health"} <= set(graphs)
    assert graphs["qps"]["series"]["server served"] == by_result["14"] + by_result["15"]
    assert graphs["qps"]["series"]["scheduled (clients sent)"] == sum(by_result.values())
    assert graphs["connections"]["series"]["server"] == 2000
    assert graphs["network"]["series"]["e2e in"] > 0  # the agent's host, app.metrics.system
    assert graphs["envelopes"]["series"]["generated"] == ledger["generated"]["count"]
    assert summary["graphite_png"] == "graphite-qps.png"
    html = (run_dir / "index.html").read_text()
    assert all(f'src="{p.name}"' in html for p in paths[:-1])


def test_cli_up_status_env_down(tmp_path, stack):
    """The commands a user types, on their own root and free ports."""
    root = tmp_path / "cli"
    ports = Ports.free()
    flags = ["--root", str(root), "--venv", str(stack.venv)] + [
        arg for name, value in vars(ports).items()
        for arg in ("--" + name.replace("_", "-"), str(value))]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "monitor.stack", *args, *flags], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    try:
        up = cli("up")
        assert up.returncode == 0, up.stderr
        assert f"statsd udp 127.0.0.1:{ports.statsd_port}" in up.stdout
        assert cli("up").returncode == 1  # already running: refused, nothing started twice
        assert cli("status").returncode == 0
        env = cli("env")
        assert env.stdout.split() == [f"HONGBAO_STATSD=127.0.0.1:{ports.statsd_port}",
                                      f"HONGBAO_GRAPHITE_URL=http://127.0.0.1:{ports.web_port}"]
        pids = json.loads((root / "stack.json").read_text())["pids"]
        down = cli("down")
        assert down.stdout.strip() == "stopped web, statsd, carbon"
        for pid in pids.values():
            with pytest.raises(ProcessLookupError):
                os.killpg(pid, 0)
        assert cli("status").returncode == 3
        assert cli("env").stdout == ""
    finally:
        recorded = Stack(root=root).load_state()
        if recorded is not None:
            recorded.down()
