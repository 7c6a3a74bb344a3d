"""One process model (app.arbiter) for SETs and client workers: restart, liveness, failing loudly.

The restart policy and the QPS timeline are pure and tested as such; the
worker is tested as the real process (control input on its stdin) and in
this process where a greenlet of its own is made to die; the agent is
tested as the real process whose worker stops reporting.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import gevent
import pytest
from gevent import socket as gsocket

from app import settings
from app.arbiter import RESTART_BACKOFF, STABLE_AFTER, RestartPolicy
from app.client.agent import Agent
from app.client.worker import EXIT_DIED, Worker
from app.local.runner import ROOT
from app.server.supervisor import SetHandle, Supervisor
from tests.reliability import start_agent  # noqa: F401  (fixture)


def test_backoff_grows_while_a_child_dies_quickly_and_resets_after_a_stable_run():
    policy = RestartPolicy()
    quick = [policy.delay(0.1) for _ in range(len(RESTART_BACKOFF) + 2)]
    assert quick == [*RESTART_BACKOFF[1:], RESTART_BACKOFF[-1], RESTART_BACKOFF[-1],
                     RESTART_BACKOFF[-1]]
    assert policy.delay(STABLE_AFTER) == RESTART_BACKOFF[0] == 0.0
    assert policy.delay(0.1) == RESTART_BACKOFF[1]


def agent_of(users: str = "1-3") -> Agent:
    """An agent object of this process (not started): its timeline and its workers' specs."""
    environ = {"HONGBAO_USERS": users, "HONGBAO_SERVER": "127.0.0.1:9", "HONGBAO_QPS": "100"}
    return Agent(settings.resolve("client", None, environ))


def test_agent_sums_its_workers_stalls_into_a_statsd_counter_and_the_second():
    agent = agent_of()
    for p, stalls in ((0, 2), (1, 3)):
        agent.account({"p": p, "t": 7, "stalls": stalls, "stall_ms": 250.0 * stalls,
                       "stall_cpu_ms": 1.5 * stalls})
    assert agent.metrics.counters["stalls"] == 5
    assert (agent.totals["stalls"], agent.totals["stall_ms"], agent.totals["stall_cpu_ms"]) == (
        5, 1250.0, 7.5)


def test_agent_target_is_the_latest_change_due_not_the_last_inserted():
    agent = agent_of()
    now = int(time.time())
    agent.set_qps(500, at_second=now + 100)
    agent.set_qps(700, at_second=now + 50)  # sent later, due earlier
    assert agent.target(now + 10) == 100
    assert agent.target(now + 60) == 700
    assert agent.target(now + 120) == 500  # the latest change due wins


def test_a_restarted_worker_applies_a_future_change_at_its_second():
    agent = agent_of()
    ticks = agent.config.ticks
    at = int(time.time()) + 30
    agent.set_qps(900, at_second=at)
    worker = Worker(agent.spec(agent.children[0]), control_fd=os.open(os.devnull, os.O_RDONLY))
    try:
        now_tick = int(time.time() * ticks)
        assert worker.timeline.at(now_tick) == 100
        assert worker.timeline.at(at * ticks - 1) == 100
        assert worker.timeline.at(at * ticks) == 900
    finally:
        worker.reactor.close()
        os.close(worker.stdin)


def worker_process(tmp_path) -> subprocess.Popen:
    spec = agent_of().spec(agent_of().children[0])
    return subprocess.Popen([sys.executable, "-m", "app.client.worker", json.dumps(spec)],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "worker.log", "wb"), start_new_session=True)


def test_malformed_control_input_is_logged_and_ignored_and_stop_still_works(tmp_path):
    proc = worker_process(tmp_path)
    try:
        for line in (b"not json\n", b"[1, 2]\n", b'{"qps": "many"}\n', b'{"what": 1}\n',
                     b'{"qps": -5, "tick": 0}\n'):
            proc.stdin.write(line)
        proc.stdin.flush()
        time.sleep(0.5)
        assert proc.poll() is None  # still serving
        proc.stdin.write(b'{"stop": true}\n')
        proc.stdin.flush()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = (tmp_path / "worker.log").read_text()
    assert log.count("ignoring control line") == 5, log


def test_a_dead_pacer_ends_the_worker_with_a_non_zero_code():
    agent = agent_of()
    read_end, write_end = os.pipe()
    worker = Worker(agent.spec(agent.children[0]), control_fd=read_end)
    run = gevent.spawn(worker.run)
    try:
        gevent.sleep(0.3)
        worker.pacer.kill(RuntimeError("injected"), block=False)
        run.join(timeout=5)
        assert run.dead and run.value == EXIT_DIED
        assert worker.died.startswith("pacer greenlet died")
    finally:
        run.kill()
        os.close(read_end)
        os.close(write_end)


def idle_worker(read_end: int) -> Worker:
    """A worker of no users at 0/s: nothing to send or connect, so its pacer idles."""
    spec = {**agent_of().spec(agent_of().children[0]), "begin": 0, "end": 0, "qps": 0,
            "changes": [(0, 0)]}
    return Worker(spec, control_fd=read_end)


@pytest.mark.parametrize("ticking", [False, True])
def test_an_event_handler_that_fails_ends_the_worker_idle_or_ticking(ticking):
    """Idle, the reactor's greenlet reads the events; ticking, the pacer does: either dies."""
    read_end, write_end = os.pipe()
    worker = idle_worker(read_end)
    run = gevent.spawn(worker.run)
    try:
        if ticking:
            os.write(write_end, b'{"qps": 50, "tick": 0}\n')
        gevent.sleep(0.3)
        assert worker.reactor.watching is not ticking

        def boom(events):
            raise RuntimeError("injected")

        worker.reactor.dispatch = boom
        os.write(write_end, b"{}\n")
        run.join(timeout=5)
        assert run.dead and run.value == EXIT_DIED
        assert worker.died.startswith("pacer" if ticking else "reactor")
        assert "injected" in worker.died
    finally:
        run.kill()
        os.close(read_end)
        os.close(write_end)


def test_a_ticking_worker_reads_at_its_ticks_and_an_idle_one_wakes_on_events():
    """No wake-up per answer while ticking (the pacer drains the epoll each tick); idle
    (sleeping up to a second), the reactor's greenlet watches again. Control lines get
    through in both."""
    read_end, write_end = os.pipe()
    worker = idle_worker(read_end)
    run = gevent.spawn(worker.run)
    try:
        gevent.sleep(0.3)
        assert worker.reactor.watching and worker.qps == 0
        os.write(write_end, b'{"qps": 50, "tick": 0}\n')  # read by the reactor's greenlet
        gevent.sleep(0.3)
        assert worker.qps == 50 and not worker.reactor.watching
        batches = worker.reactor.batches
        os.write(write_end, b'{"qps": 0, "tick": 0}\n')  # read by the pacer, at a tick
        gevent.sleep(0.3)
        assert worker.qps == 0 and worker.reactor.watching
        assert worker.reactor.batches > batches
        os.write(write_end, b'{"stop": true}\n')
        run.join(timeout=5)
        assert run.dead and run.value == 0
    finally:
        run.kill()
        os.close(read_end)
        os.close(write_end)


def test_a_worker_that_stops_reporting_is_killed_and_restarted(start_server, start_agent):  # noqa: F811
    server = start_server(sets=1)
    agent = start_agent(server, (1, 200), processes=2, liveness_timeout=2)
    agent.wait_connected()
    victim = agent.get("/stats")["processes"][1]
    os.kill(victim["pid"], signal.SIGSTOP)  # alive but silent: no report, no exit
    deadline = time.time() + 20
    while time.time() < deadline:
        procs = agent.get("/stats")["processes"]
        if procs[1]["pid"] != victim["pid"]:
            break
        time.sleep(0.2)
    assert procs[1]["restarts"] == 1 and procs[1]["pid"] != victim["pid"], procs
    assert procs[0]["restarts"] == 0
    agent.wait_connected()
    assert agent.get("/health")["restarts"] == 1


class _Seen:
    """What ``Supervisor._read_answers`` needs of its supervisor: the liveness mark."""

    def __init__(self) -> None:
        self.marks = 0

    def seen(self, handle) -> None:
        self.marks += 1


def test_a_control_answer_later_than_its_asker_neither_desyncs_nor_hides_the_set():
    """A slow SET answering in pieces: the asker times out, the next ask gets its own answer.

    Before the per-socket reader, the timed-out asker's readline dropped the
    half line it had read; every later ask then read out of step and the
    SET, busy but alive, was killed by the liveness rule.
    """
    handle = SetHandle(0)
    ours, theirs = gsocket.socketpair()
    handle.control = ours
    owner = _Seen()
    reader = gevent.spawn(Supervisor._read_answers, owner, handle, ours)
    served = []

    def slow_set() -> None:
        lines = theirs.makefile("rb")
        for delay in (0.4, 0.0):
            request = json.loads(lines.readline())
            served.append(request["op"])
            answer = json.dumps({"op": request["op"], "seq": request["seq"]}).encode() + b"\n"
            theirs.sendall(answer[:5])  # half a line, then the rest later
            gevent.sleep(delay)
            theirs.sendall(answer[5:])

    fake_set = gevent.spawn(slow_set)
    with pytest.raises(gevent.Timeout):
        Supervisor.ask(owner, handle, {"op": "first"}, timeout=0.2)
    assert Supervisor.ask(owner, handle, {"op": "second"}, timeout=2.0) == {"op": "second"}
    assert served == ["first", "second"]
    assert owner.marks == 2  # the late answer too was a sign of life
    assert handle.waiting == {}
    fake_set.join(timeout=2)
    theirs.close()
    reader.join(timeout=2)
    assert reader.dead
    with pytest.raises(OSError):
        handle.control = None
        Supervisor.ask(owner, handle, {"op": "third"}, timeout=0.5)



def test_a_late_report_counts_answers_by_the_second_they_were_read_in(capsys):
    """A pacer that writes second N's report 50 ms into N+1 must not count N+1's answers;
    "served" counts the same way the answers that served the ask (not 17, overload)."""
    agent = agent_of()
    worker = Worker(agent.spec(agent.children[0]), control_fd=os.open(os.devnull, os.O_RDONLY))

    def answers(n: int, at: float, result: int = 15) -> None:
        for _ in range(n):
            worker._count_answer(result, at)

    try:
        n = 1_800_000_000
        answers(40, n + 0.99)
        answers(6, n + 1.03)  # read before the late report of second n
        answers(1, n + 1.04, result=17)
        worker.report(n)
        answers(5, n + 1.5, result=14)
        worker.report(n + 1)
        answers(3, n + 2.2)
        answers(2, n + 3.1)
        worker.report(n + 3)  # the report of n + 2 was skipped (a starved pacer): folded in
        records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    finally:
        worker.reactor.close()
        os.close(worker.stdin)
    assert [(r["t"], r["answered"], r["served"]) for r in records] == [
        (n, 40, 40), (n + 1, 12, 11), (n + 3, 5, 5)]


@contextlib.contextmanager
def connected_worker(**spec: object) -> Iterator[Worker]:
    """A worker at 3/s whose users are all logged in, each on one end of a socketpair."""
    import socket

    from app.client.worker import READY
    from app.protocol import ClientSession, Phase

    spec = {**agent_of().spec(agent_of().children[0]), "qps": 3, "changes": [(0, 3)], **spec}
    worker = Worker(spec, control_fd=os.open(os.devnull, os.O_RDONLY))
    pairs = [socket.socketpair() for _ in worker.conns]
    try:
        for conn, (ours, _) in zip(worker.conns, pairs, strict=True):
            conn.fd, conn.state = ours.fileno(), READY
            conn.session = ClientSession(conn.userid)
            conn.session.phase = Phase.OPEN
        yield worker
    finally:
        for a, b in pairs:
            a.close()
            b.close()
        worker.reactor.close()
        os.close(worker.stdin)


def test_a_tick_sent_after_its_second_ended_is_counted_as_sent_late(capsys):
    """What a late pacer sends cannot arrive within its second: the report says how much."""
    with connected_worker() as worker:
        ticks, second = worker.ticks, int(time.time()) - 10
        for k in range(ticks):  # a second whose ticks all ran after it had ended
            worker.run_tick(second * ticks + k, second + 1.2)
        assert worker.sent == worker.sent_late == {second: 3}
        for conn in worker.conns:
            conn.sent_at = 0.0  # answered
        capsys.readouterr()
        for k in range(ticks):  # the next one on time (its first tick reports the last)
            worker.run_tick((second + 1) * ticks + k, second + 1.5)
        report = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert (report["t"], report["sent"], report["sent_late"]) == (second, 3, 3)
        assert worker.sent == {second + 1: 3} and worker.sent_late == {}


def test_a_pacer_stall_is_counted_with_the_process_cpu_over_its_stretch(capsys):
    """A wake-up STALL_S behind its tick is a stall; the report says how late and with what CPU."""
    from app.client.worker import STALL_S

    with connected_worker() as worker:
        worker.last_cpu = 3.0
        worker.note_lag(STALL_S / 2, 3.001)  # late, not stalled
        worker.note_lag(STALL_S + 0.15, 3.011)  # 10 ms of CPU since the last wake-up
        worker.note_lag(0.01, 3.012)
        assert (worker.stalls, worker.last_cpu) == (1, 3.012)
        assert worker.stall_ms == pytest.approx((STALL_S + 0.15) * 1000)
        assert worker.stall_cpu_ms == pytest.approx(10.0)
        capsys.readouterr()
        worker.report(int(time.time()) - 1)
        report = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert (report["stalls"], report["stall_ms"], report["stall_cpu_ms"]) == (
            1, round((STALL_S + 0.15) * 1000, 3), 10.0)
        assert report["lag_ms"] == round((STALL_S + 0.15) * 1000, 3)
        assert (worker.stalls, worker.stall_ms, worker.stall_cpu_ms, worker.lag) == (0, 0, 0, 0)


def test_a_worker_sends_its_second_before_the_quiet_end():
    """With ``quiet_ms`` the last ticks of a second send nothing; the others send it all."""
    with connected_worker(ticks=20, quiet_ms=100) as worker:
        assert worker.quiet == 2  # 100 ms of 50 ms ticks
        second = int(time.time()) - 10
        by_tick = []
        for k in range(20):
            before = worker.sent.get(second, 0)
            worker.run_tick(second * 20 + k, second + k / 20)
            by_tick.append(worker.sent.get(second, 0) - before)
        assert sum(by_tick) == 3 and not any(by_tick[18:])  # all asked, none in the last 100 ms
        assert sum(1 for n in by_tick if n) == 3  # spread over the ticks that send


def ticking_worker(read_end: int, ticks: int) -> Worker:
    """A worker of no users at a rate: its pacer ticks (sending nothing) ``ticks`` a second."""
    spec = {**agent_of().spec(agent_of().children[0]), "begin": 0, "end": 0, "qps": 50,
            "changes": [(0, 50)], "ticks": ticks, "quiet_ms": 0}
    return Worker(spec, control_fd=read_end)


def test_a_ticking_pacer_sleeps_without_turning_the_hub_every_tick():
    """20 ticks a second, not 20 hub wake-ups: the hub turns about once a second."""
    read_end, write_end = os.pipe()
    worker = ticking_worker(read_end, 20)
    run = gevent.spawn(worker.run)
    loop = gevent.get_hub().loop
    try:
        gevent.sleep(0.5)
        assert not worker.reactor.watching  # ticking
        ticks, turns = worker.last_tick, loop.iteration
        gevent.sleep(3.0)  # back after ~3 s: the pacer turns the hub at every second's start
        ticks, turns = worker.last_tick - ticks, loop.iteration - turns
        assert ticks >= 50, ticks  # it kept ticking
        assert turns <= 20, (turns, ticks)  # through the hub it was one turn a tick (>= 50)
    finally:
        run.kill()
        os.close(read_end)
        os.close(write_end)


def test_a_ticking_pacer_still_wakes_a_greenlet_whose_socket_turns_ready():
    """The pacer's sleep includes the hub's descriptor: gevent I/O is served at once,
    not at the next tick (500 ms away here)."""
    import threading

    read_end, write_end = os.pipe()
    worker = ticking_worker(read_end, 2)
    run = gevent.spawn(worker.run)
    ours, theirs = gsocket.socketpair()
    woke: list[float] = []
    sent: list[float] = []

    def reader() -> None:
        ours.recv(1)
        woke.append(time.time())

    def writer() -> None:  # a real thread: the pacer blocks this one in its epoll
        time.sleep(0.8)
        sent.append(time.time())
        os.write(theirs.fileno(), b"x")

    greenlet = gevent.spawn(reader)
    thread = threading.Thread(target=writer)
    try:
        gevent.sleep(0.1)
        thread.start()
        greenlet.join(timeout=5)
        assert woke, "the reader was never woken"
        assert not worker.reactor.watching  # the pacer was ticking all along
        assert woke[0] - sent[0] < 0.2, woke[0] - sent[0]
    finally:
        thread.join()
        greenlet.kill()
        run.kill()
        ours.close()
        theirs.close()
        os.close(read_end)
        os.close(write_end)
