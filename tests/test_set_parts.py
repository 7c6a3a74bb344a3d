"""The SET's parts with no server process: commit step, journal writer, stats, service rules.

Each test here is for a numbered defect of issue 11 (or a rule that
replaced it) and fails on the code before the fix.
"""

from __future__ import annotations

import errno
import os
import time

import gevent
import pytest

from app import protocol as p
from app.metrics import system as sysmetrics
from app.metrics.statsd import Metrics
from app.server import set_worker
from app.server.journal import JournalWriter, read_journal, record_offsets
from app.server.ledger import MAX_EID, IdsExhausted, Ledger
from app.server.service import Service, campaign_problem
from app.server.set_stats import SetStats
from app.server.transport import Conn, Transport

CONFIG = {"shake_budget": 1000, "amount_min": 1, "amount_max": 10, "group_amount_min": 3,
          "group_amount_max": 30, "claim_ttl": 60}


class NoReactor:
    """Registration calls are accepted and forgotten (no sockets in these tests)."""

    def register(self, *args) -> None:
        pass

    unregister = modify = register


def a_set(journal: JournalWriter) -> set_worker.SetWorker:
    """A SetWorker wired as ``init_process`` does, minus listener, inbox and greenlets."""
    worker = set_worker.SetWorker(0, 1, 0, -1, [], -1, CONFIG)
    worker.journal = journal
    worker.ledger = Ledger(0, 1, journal)
    worker.metrics = Metrics("test", None)
    worker.transport = Transport(NoReactor(), worker.stats.count)
    worker.service = Service(0, 1, CONFIG, worker.ledger, worker.transport, worker.stats,
                             worker.metrics)
    return worker


def connected(worker: set_worker.SetWorker, userid: int) -> tuple[Conn, int]:
    """A logged-in Conn writing into a pipe (write_some only writes); and the reading end."""
    read_end, write_end = os.pipe()
    conn = Conn(write_end)
    conn.resume(userid)
    worker.transport.conns[conn.fd] = conn
    worker.transport.users[userid] = conn
    return conn, read_end


def test_failed_journal_write_releases_no_answer_and_halts(tmp_path):
    """Issue 11 item 1: the answers of a batch whose journal write failed never go out."""
    journal = JournalWriter(str(tmp_path / "j"))
    worker = a_set(journal)
    worker.ledger.set_yao(10, 10)
    worker.ledger.generate(5)
    worker.commit()
    conn, peer = connected(worker, 7)
    worker.service.serve(conn, [p.ShakeAsked(0)], int(time.time()))
    assert conn.out  # the GOT answer is queued
    full = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
    os.dup2(full, journal.fd)
    os.close(full)
    with pytest.raises(set_worker.SetHalt, match="journal write failed"):
        worker.commit()
    assert worker.halted and conn.out == b"" and journal.pending == 1
    worker.transport.send(conn, b"late")
    worker.commit()  # halted: neither the journal nor the answers move any more
    os.set_blocking(peer, False)
    with pytest.raises(BlockingIOError):
        os.read(peer, 100)  # nothing ever reached the client
    os.close(peer)
    worker.transport.close_all()


def test_journal_keeps_a_failed_batch_pending_and_off_the_file(tmp_path):
    """The writer no longer forgets records whose write failed (issue 11 item 1)."""
    path = tmp_path / "j"
    journal = JournalWriter(str(path))
    journal.append(b"G", 0, 5)
    journal.flush()
    journal.append(b"G", 1, 6)
    full = os.open("/dev/full", os.O_WRONLY)
    saved = os.dup(journal.fd)
    os.dup2(full, journal.fd)
    with pytest.raises(OSError) as info:
        journal.flush()
    assert info.value.errno == errno.ENOSPC
    assert journal.pending == 1 and journal.records == 1
    os.dup2(saved, journal.fd)  # the disk has room again: the same batch is written
    os.close(saved)
    os.close(full)
    journal.flush()
    assert read_journal(str(path)) == ([(b"G", (0, 5)), (b"G", (1, 6))], 0)


@pytest.mark.parametrize("durability, syncs", [("written", 0), ("fdatasync", 3)])
def test_durability_fdatasync_syncs_every_batch_before_its_answers(tmp_path, durability,
                                                                   syncs):
    journal = JournalWriter(str(tmp_path / "j"), durability)
    for i in range(3):
        journal.append(b"G", i, 1)
        journal.append(b"G", i + 10, 1)  # two records, one batch, one sync
        journal.flush()
    assert journal.syncs == syncs and journal.records == 6


def test_durability_must_be_a_known_mode(tmp_path):
    with pytest.raises(ValueError, match="durability"):
        JournalWriter(str(tmp_path / "j"), "sometimes")


def test_envelope_id_exhaustion_is_a_run_time_limit_not_a_boot_error():
    """Issue 11 item 5: IdsExhausted (exit 75, restarted), not LedgerError (exit 3)."""
    ledger = Ledger(0, 1)
    ledger.c["next_seq"] = MAX_EID
    ledger.generate(5)  # the last id there is
    with pytest.raises(IdsExhausted, match="exhausted"):
        ledger.generate(5)
    assert ledger.c["gen_count"] == 1


def test_set_stats_ship_only_the_seconds_asked_for():
    """Issue 11 item 7: ``since`` cuts the per-second tables, not only the health rows."""
    stats = SetStats()
    for second in range(1000, 1300):
        stats.shake(p.ShakeCode.GOT, second, second)
    tables = stats.tables(since=1290)
    assert sorted(tables["by_sent"]) == [str(s) for s in range(1290, 1300)]
    assert sorted(tables["by_arrival"]) == [str(s) for s in range(1290, 1300)]
    assert len(stats.tables()["by_sent"]) == 300


@pytest.mark.parametrize("budget, sets", [(100000, 7), (5, 11), (3, 3), (1, 2)])
def test_budget_shares_sum_to_the_server_budget(budget, sets):
    shares = [Service(k, sets, {**CONFIG, "shake_budget": budget}, Ledger(k, sets), None, None,
                      None).budget for k in range(sets)]
    assert sum(shares) == budget and max(shares) - min(shares) <= 1


@pytest.mark.parametrize("kind, fields, config, problem", [
    (b"Y", (10, 100), {"amount_min": 500, "amount_max": 1}, "amount_min 500"),
    (b"Y", (0, 100), {"amount_min": 500, "amount_max": 1}, ""),  # no rate: nothing to run
    (b"Y", (10, 100), {"amount_min": 1, "amount_max": 500}, ""),
    (b"F", (5, 10, 100, 1), {}, "min 100 > max 1"),
    (b"F", (5, 10, 1, 100), {"group_amount_min": 90, "group_amount_max": 9},
     "group_amount_min 90"),
])
def test_campaign_problems_name_the_setting(kind, fields, config, problem):
    assert (campaign_problem({**CONFIG, **config}, kind, fields) != "") == bool(problem)
    assert problem in campaign_problem({**CONFIG, **config}, kind, fields)


def test_record_offsets_locate_each_record(tmp_path):
    journal = JournalWriter(str(tmp_path / "j"))
    journal.append(b"Y", 1, 2)
    journal.append(b"G", 0, 5)
    journal.append(b"F", 1, 2, 3, 4)
    journal.flush()
    records, _ = read_journal(str(tmp_path / "j"))
    data = (tmp_path / "j").read_bytes()
    assert [data[o : o + 1] for o in record_offsets(records)] == [b"Y", b"G", b"F"]


# How a test starts a reactor: its own greenlet on the hub (client workers), or as
# the process's clocked main loop (SETs: Reactor.start_clocked).
# The hub's timers (gevent.sleep) run at least once a tick in the clocked loop.
STARTS = {"hub": lambda r: r.start(),
          "clocked": lambda r: r.start_clocked(0.5, lambda tick, late: None)}


@pytest.mark.parametrize("start", STARTS.values(), ids=STARTS.keys())
def test_a_reactor_behind_on_full_batches_still_lets_timers_and_other_greenlets_run(monkeypatch,
                                                                                    start):
    """A SET that is behind gets a full batch every poll; its control socket and its
    timers (per-second stats, liveness answers) must still run between batches.

    With gevent.sleep(0) between batches the loop turned only every 50 of them
    (gevent runs up to 50 callbacks before it checks the clock): at 200k
    connections that was 20 s without the control greenlet.
    """
    import socket

    import gevent

    from app import reactor as reactor_module

    monkeypatch.setattr(reactor_module, "MAX_EVENTS", 2)
    pairs = [socket.socketpair() for _ in range(3)]
    batches = []

    def dispatch(events: list) -> None:  # a slow batch, as on a machine out of CPU
        batches.append(len(events))
        time.sleep(0.01)

    r = reactor_module.Reactor(dispatch)
    for ours, theirs in pairs:
        theirs.send(b"x")  # never read: level-triggered, ready on every poll
        r.register(ours.fileno())
    ticks = []

    def timer() -> None:
        for _ in range(5):
            gevent.sleep(0.01)
            ticks.append(time.monotonic())

    started = time.monotonic()
    start(r)
    gevent.spawn(timer).join(timeout=2.0)
    r.close()
    for ours, theirs in pairs:
        ours.close()
        theirs.close()
    assert len(ticks) == 5, f"the timer greenlet ran {len(ticks)} of 5 times in 2 s"
    assert ticks[-1] - started < 1.0
    assert batches and max(batches) == 2  # every poll was a full batch


def test_journal_sync_can_run_its_fsync_elsewhere_and_stays_dirty_when_it_fails(tmp_path):
    """The SET fsyncs in a thread (the loop serves on meanwhile); a failed fsync is retried."""
    writer = JournalWriter(str(tmp_path / "j"))
    calls = []
    writer.append(b"G", 1, 2)

    def failing(fn, args):
        calls.append((fn, args))
        raise OSError(errno.EIO, "disk gone")

    with pytest.raises(OSError):
        writer.sync(failing)
    assert calls == [(os.fsync, (writer.fd,))]
    assert writer.syncs == 0

    def ran(fn, args):
        calls.append((fn, args))
        fn(*args)

    writer.sync(ran)  # still dirty from the failure: synced now
    assert len(calls) == 2 and writer.syncs == 1
    writer.sync(ran)  # nothing new written: no fsync
    assert len(calls) == 2
    writer.close()


def test_a_sets_loop_lag_is_measured_by_its_generation_ticks(tmp_path):
    """No probe greenlet of its own (one wake-up less per SET every 100 ms): the
    generation loop's lateness is the SET's loop lag, and a blocked loop shows in it."""
    from app import reactor as reactor_module

    worker = a_set(JournalWriter(str(tmp_path / "j")))
    worker.loop_lag = sysmetrics.LoopLag()
    r = reactor_module.Reactor(lambda events: None)
    r.start_clocked(1 / set_worker.GEN_TICKS, worker._on_tick)
    try:
        gevent.sleep(0.5)
        calm = worker.loop_lag.take()
        time.sleep(0.35)  # the whole process stands still past a tick
        gevent.sleep(0.2)
        blocked = worker.loop_lag.take()
    finally:
        r.close()
    assert calm < 100 and blocked >= 200


@pytest.mark.parametrize("sents", [[100] * 6, [100, 99, 100, 100, 42, 101]])
def test_stats_of_a_batch_equal_the_stats_of_its_shakes_one_by_one(sents):
    """``SetStats.shakes`` (the bulk path) counts exactly what ``shake`` per entry counts."""
    bulk, single = SetStats(), SetStats()
    bulk.shakes(sents, 2, 4, 100)
    codes = [14, 14, 15, 15, 17, 17]
    for code, sent in zip(codes, sents, strict=True):
        single.shake(code, sent, 100)
    assert bulk.tables() == single.tables() and bulk.shake_totals == single.shake_totals
    assert bulk.shake_totals == [2, 2, 0, 2]


@pytest.mark.parametrize("start", STARTS.values(), ids=STARTS.keys())
def test_a_woken_reactor_waits_its_coalescing_time_before_it_reads(start):
    """A burst's first byte wakes the reactor; what the burst writes within ``coalesce``
    is read with it, in one batch (app.reactor: coalescing before the first read)."""
    import socket
    import threading

    from app import reactor as reactor_module

    pairs = [socket.socketpair() for _ in range(3)]
    batches: list[set[int]] = []
    r = reactor_module.Reactor(lambda events: batches.append({fd for fd, _ in events}),
                               coalesce=0.2)
    ours_fds = {ours.fileno() for ours, _ in pairs}
    for fd in ours_fds:
        r.register(fd)

    def burst() -> None:  # another writer: three sockets 20 ms apart, well inside 200 ms
        time.sleep(0.51 - time.time() % 0.5)  # just after a tick: the clocked loop's
        for _, theirs in pairs:  # coalescing stops at the next one
            theirs.send(b"x")
            time.sleep(0.02)

    start(r)
    gevent.sleep(0.05)
    writer = threading.Thread(target=burst)  # a real thread: the reactor wakes meanwhile
    writer.start()
    waited = time.monotonic()
    while (writer.is_alive() or not batches) and time.monotonic() - waited < 5:
        gevent.sleep(0.05)  # not writer.join(): that would block the reactor too
    writer.join()
    r.close()
    for ours, theirs in pairs:
        ours.close()
        theirs.close()
    assert batches[0] == ours_fds


def test_a_clocked_reactor_wakes_the_hub_for_its_sockets_and_turns_it_on_its_timer_ticks():
    """Blocking in its own epoll, the SET's loop still serves the greenlets that wait in
    gevent's hub: a socket one of them waits on wakes it at once (the hub's descriptor is
    in the reactor's epoll), not at the next tick; the hub's timers run after every tick
    (``timer_ticks`` 1) or only after every ``timer_ticks``-th; ticks come in order, none
    skipped on an idle loop, and the dispatcher never sees the hub's descriptor."""
    import socket
    import threading

    from gevent import socket as gsocket

    from app import reactor as reactor_module

    seen: list[int] = []
    r = reactor_module.Reactor(lambda events: seen.extend(fd for fd, _ in events))
    r.start_clocked(1.0, lambda tick, late: None)  # ticks a second apart
    ours, theirs = socket.socketpair()
    watched = gsocket.socket(fileno=ours.detach())
    got: list[tuple[bytes, float]] = []
    reader = gevent.spawn(lambda: got.append((watched.recv(10), time.monotonic())))
    sent: list[float] = []

    def write_later() -> None:  # a real thread: the whole process may be blocked in epoll
        time.sleep(1.2 - time.time() % 1.0)  # 0.2 s after a tick, 0.8 s before the next
        sent.append(time.monotonic())
        theirs.send(b"ping")

    writer = threading.Thread(target=write_later)
    writer.start()
    reader.join(timeout=5)
    writer.join()
    r.close()
    watched.close()
    theirs.close()
    assert got and got[0][0] == b"ping"
    assert got[0][1] - sent[0] < 0.5, "the reader waited for a tick, not for its socket"

    ticks: list[int] = []
    r = reactor_module.Reactor(lambda events: seen.extend(fd for fd, _ in events))
    r.start_clocked(0.05, lambda tick, late: ticks.append(tick))
    slept: list[int] = []
    sleeper = gevent.spawn(lambda: [slept.append(gevent.sleep(0.01) or 1) for _ in range(10)])
    sleeper.join(timeout=5)  # never, were the hub not turned: nothing else wakes it
    r.close()
    assert len(slept) == 10
    assert len(ticks) >= 5 and ticks == list(range(ticks[0], ticks[0] + len(ticks)))
    assert seen == []

    # timer_ticks: the hub's timers run only after the ticks that are its multiples
    ticks.clear()
    r = reactor_module.Reactor(lambda events: None)
    r.start_clocked(0.02, lambda tick, late: ticks.append(tick), timer_ticks=4)
    woke_after: list[int] = []

    def sleep_often() -> None:
        for _ in range(6):
            gevent.sleep(0.005)
            woke_after.append(ticks[-1] if ticks else -1)

    sleeper = gevent.spawn(sleep_often)
    sleeper.join(timeout=5)
    r.close()
    assert len(woke_after) == 6
    assert all(t % 4 == 0 for t in woke_after), woke_after  # no turn after the others
    assert any(t % 4 for t in ticks)  # the other ticks ran, without a turn


def _clocked_under_a_trickle(coalesce: float, period: float) -> dict:
    """A clocked reactor with read slots of ``coalesce``, ticking every ``period``: 1 s of
    a byte every 5 ms from another process, then 1 s idle. Wake-ups are this thread's
    voluntary context switches (a writer thread would add switches of its own, for the
    GIL); ``due``: where in ``period`` each tick was due, ``late``: how late it ran."""
    import resource
    import socket
    import subprocess
    import sys

    from app import reactor as reactor_module

    def switches() -> int:
        return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw

    ours, theirs = socket.socketpair()
    batches: list[int] = []
    r = reactor_module.Reactor(lambda events: batches.append(len(os.read(ours.fileno(), 4096))),
                               coalesce=coalesce)
    r.register(ours.fileno())
    ticks: list[int] = []
    due: list[float] = []
    lateness: list[float] = []

    def on_tick(tick: int, late: float) -> None:
        ticks.append(tick)
        due.append((time.time() - late) % period)
        lateness.append(late)

    r.start_clocked(period, on_tick)
    trickle = ("import os, sys, time\n"
               "end = time.time() + 1.0\n"
               "while time.time() < end:\n"
               "    os.write(int(sys.argv[1]), b'x')\n"
               "    time.sleep(0.005)\n")
    gevent.sleep(0)
    before = switches()
    writer = subprocess.Popen([sys.executable, "-c", trickle, str(theirs.fileno())],
                              pass_fds=[theirs.fileno()])
    try:
        while writer.poll() is None:
            gevent.sleep(0.1)
    finally:
        writer.kill()
        writer.wait()
    loaded = switches() - before
    reads, loaded_ticks = len(batches), len(ticks)
    gevent.sleep(0.2)  # the last bytes read, then quiet
    before = switches()
    gevent.sleep(1.0)
    idle, idle_ticks = switches() - before, len(ticks) - loaded_ticks
    r.close()
    ours.close()
    theirs.close()
    return {"loaded": loaded, "reads": reads, "bytes": sum(batches), "loaded_ticks": loaded_ticks,
            "idle": idle, "idle_ticks": idle_ticks, "ticks": ticks, "due": due, "late": lateness}


def test_a_clocked_reactor_wakes_once_a_slot_when_loaded_and_only_for_its_ticks_when_idle():
    """The SET's coalescing by wall-clock slots (``Reactor._run_clocked``): under a steady
    trickle each read is one wake-up (a sleep to the next slot start), not two (woken by
    the first byte, then a gathering sleep); idle, the slots cost no wake-up at all."""
    got = _clocked_under_a_trickle(coalesce=0.05, period=0.5)  # the test's sleeps end at ticks
    reads, loaded, loaded_ticks = got["reads"], got["loaded"], got["loaded_ticks"]
    assert reads >= 10 and got["bytes"] > 2 * reads  # several bytes gathered in each read
    # one wake-up a read (the old way: two) or a tick
    assert loaded <= reads + loaded_ticks + 2, (loaded, reads, loaded_ticks)
    assert got["idle"] <= got["idle_ticks"] + 2, got  # no slot wakes an idle reactor
