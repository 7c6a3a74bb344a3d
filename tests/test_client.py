"""The client agent against the real server, over real loopback sockets.

Counting rule for per-second exactness: every SHAKE carries in its header the
wall-clock second it was scheduled in, and the server's ``per_second``
counts by that stamp. So a request in flight across a second boundary
still counts in the second it belongs to, and the check is exact equality:
for every full second of the steady phase, the server's count equals the
sum of the hosts' shares. (``per_second_arrival`` counts by arrival; there
the ±1% allowance for in-flight requests would apply — it is not asserted.)

All agents and servers are stopped by PID in the fixtures' finalizers.
"""

from __future__ import annotations

import sys
import time
from math import ceil

import pytest

from app.client.schedule import share
from tests.reliability import AgentProcess


@pytest.fixture
def agents(tmp_path):
    """Factory: ``agents(server, (first, last), host_index=0, hosts=1, qps=0, **flags)``."""
    started: list[AgentProcess] = []

    def start(server, users: tuple[int, int], host_index: int = 0, hosts: int = 1,
              qps: int = 0, **flags: object) -> AgentProcess:
        agent = AgentProcess(tmp_path / f"client{host_index}-{time.time_ns()}.log", server.port,
                             users, qps, source=f"127.1.0.{host_index + 1}",
                             server_control=f"127.0.0.1:{server.control_port}", hosts=hosts,
                             host_index=host_index, host_name=f"test{host_index}", **flags)
        started.append(agent)
        return agent.start()

    yield start
    for agent in started:
        agent.stop()


def sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.time()))


def complete_stats(server, tries: int = 5) -> dict:
    """The server's /stats with every SET's part (a busy box can drop or time one out)."""
    for _ in range(tries):
        try:
            stats = server.stats()
            if stats.get("sets_up") == stats.get("sets"):
                return stats
        except OSError:
            pass
        time.sleep(0.5)
    return server.stats()


def test_server_counts_equal_the_sum_of_the_shares_every_second(start_server, agents):
    server = start_server(sets=4)
    total, hosts, per_host, steady = 1501, 3, 1000, 30  # 1501: the shares differ (501/500/500)
    fleet = [agents(server, (1 + k * per_host, (k + 1) * per_host), host_index=k, hosts=hosts,
                    **({"processes": 2} if k == 0 else {}))  # host 0 splits over 2 workers
             for k in range(hosts)]
    for agent in fleet:
        agent.wait_connected(per_host)
    at = int(time.time()) + 2
    for agent in fleet:
        assert agent.get(f"/qps?total={total}&at={at}")["from"] == at
    end = at + steady
    sleep_until(end + 1.5)  # the last second complete at both ends

    coverage = [agent.get("/coverage") for agent in fleet]
    stats = complete_stats(server)
    counted = {r["second"]: r["shakes"] for r in stats["per_second"]}
    wrong = {t: counted.get(t) for t in range(at, end) if counted.get(t) != total}
    assert not wrong, f"server seconds off the target {total}: {wrong}"
    for k, agent in enumerate(fleet):
        rows = {r["second"]: r for r in agent.get(f"/stats?since={at}")["per_second"]}
        sent = {t: rows[t]["sent"] for t in range(at, end)}
        assert set(sent.values()) == {share(total, hosts, k)}, sent
        assert all(rows[t]["skipped"] == 0 for t in range(at, end))
        # each second says how late its latest pacer woke (a late send arrives late)
        assert all(0 <= rows[t]["lag_ms"] < 1000 for t in range(at, end)), rows
    # every user in each host's range asked within n/q seconds, all equally often
    now = int(time.time())
    for k, cov in enumerate(coverage):
        q = share(total, hosts, k)
        assert cov["users"] == per_host and cov["never"] == 0, cov
        assert cov["asks_max"] - cov["asks_min"] <= 1, cov
        assert cov["oldest_second"] >= now - ceil(per_host / q) - 2, cov
    health = fleet[0].get("/stats")
    assert health["clock_offset_ms"] is not None and abs(health["clock_offset_ms"]) < 50


def test_every_worker_is_scheduled_as_a_batch_task_and_the_agent_is_not(start_server, agents):
    """Woken by an answer a worker must not preempt the SET still writing the rest
    (app.arbiter.batch_scheduling; measured in docs/benchmarks-history.rst, "One
    scheduling group")."""
    import os

    server = start_server(sets=1)
    agent = agents(server, (1, 200), processes=2)
    agent.wait_connected(200)
    pids = [proc["pid"] for proc in agent.get("/stats")["processes"]]
    assert len(pids) == 2 and all(pids)
    assert all(os.sched_getscheduler(pid) == os.SCHED_BATCH for pid in pids)
    assert os.sched_getscheduler(agent.proc.pid) == os.SCHED_OTHER


def test_reconnects_converge_after_a_server_restart_without_a_stampede(start_server, agents):
    server = start_server(sets=2)
    port, n, rate = server.port, 3000, 1000
    agent = agents(server, (1, n), qps=300, connect_rate=rate)
    agent.wait_connected(n)
    lost_at = int(time.time())
    server.terminate()
    time.sleep(1.5)  # down long enough for failed attempts to back off
    start_server(sets=2, port=port)
    converged = agent.wait_connected(n, timeout=60)
    time.sleep(1.2)  # the last second's record
    rows = agent.get(f"/stats?since={lost_at}")["per_second"]
    connects = [r["connects"] for r in rows]
    # token bucket: at most `rate` a second plus a burst of rate/10
    assert max(connects) <= rate * 1.1 + 1, connects
    assert sum(r["logins"] for r in rows) >= n
    assert converged < 45


def test_qps_change_takes_effect_within_one_second(start_server, agents):
    server = start_server(sets=2)
    agent = agents(server, (1, 2000), qps=200, pacing="burst")
    agent.wait_connected(2000)
    time.sleep(1.5)
    asked = time.time()
    answer = agent.get("/qps?qps=700")
    # applied two ticks (20 ms) after the agent took the request; slack for a busy box
    assert answer["previous"] == 200 and answer["from"] - asked < 0.5
    change = int(answer["from"])  # the partial second; the next one is all at the new rate
    sleep_until(change + 3.2)
    rows = {r["second"]: r["sent"] for r in agent.get(f"/stats?since={change - 1}")["per_second"]}
    assert rows[change - 1] == 200 and 200 <= rows[change] <= 700
    assert rows[change + 1] == 700 and rows[change + 2] == 700
    counted = {r["second"]: r["shakes"] for r in complete_stats(server)["per_second"]}
    assert counted[change + 1] == 700
    assert agent.get("/qps?total=0")["qps"] == 0


def test_qps_route_refuses_nonsense(start_server, agents):
    server = start_server(sets=1)
    agent = agents(server, (1, 10))
    import urllib.error

    for path in ("/qps", "/qps?qps=-1", "/qps?total=5&index=3&hosts=2", "/qps?qps=1&at=x"):
        with pytest.raises(urllib.error.HTTPError) as info:
            agent.get(path)
        assert info.value.code == 400, path


def test_a_killed_worker_is_restarted_and_its_users_come_back(start_server, agents):
    import os
    import signal

    server = start_server(sets=2)
    agent = agents(server, (1, 2000), qps=100, processes=2, statsd="127.0.0.1:9")
    agent.wait_connected(2000)
    victim = agent.get("/stats")["processes"][1]
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.time() + 30
    while time.time() < deadline:
        procs = agent.get("/stats")["processes"]
        if procs[1]["restarts"] == 1 and procs[1]["pid"] != victim["pid"]:
            break
        time.sleep(0.2)
    assert procs[1]["restarts"] == 1, procs
    agent.wait_connected(2000)
    assert agent.get("/stats")["processes"][0]["restarts"] == 0


def test_the_client_bench_measures_and_cleans_up():
    import json
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "app.bench.client", "--users", "300",
                           "--qps", "300", "--seconds", "2", "--sets", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    (loaded,) = result["loaded"]
    assert loaded["sent_per_second"] == 300 and loaded["us_per_request"] > 0


def test_a_restarted_worker_keeps_the_current_rate_until_a_scheduled_change(start_server,
                                                                            agents):
    """Issue 11 item 6: a future /qps change reaches a restarted worker as a future change."""
    import os
    import signal

    server = start_server(sets=2)
    agent = agents(server, (1, 1000), qps=100, processes=1)
    agent.wait_connected(1000)
    at = int(time.time()) + 10
    assert agent.get(f"/qps?qps=300&at={at}")["from"] == at
    victim = agent.get("/stats")["processes"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    deadline = time.time() + 20
    while agent.get("/stats")["processes"][0]["pid"] in (victim, None):
        assert time.time() < deadline, "worker not restarted"
        time.sleep(0.1)
    agent.wait_connected(1000)
    back = int(time.time()) + 1  # the first whole second with every user back
    sleep_until(at + 2.5)
    rows = {r["second"]: r for r in agent.get(f"/stats?since={back}")["per_second"]}
    before = [rows[t]["sent"] + rows[t]["skipped"] for t in range(back, at)]
    assert before and set(before) == {100}, (back, at, before)
    assert rows[at + 1]["sent"] + rows[at + 1]["skipped"] == 300
    assert agent.get("/health")["restarts"] == 1
