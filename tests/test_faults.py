"""Faults under real load: a SET killed -9, the supervisor stopped, the whole server restarted.

Each test drives a small, bounded load with blocking test clients and checks
the money afterwards: the ledger balances exactly, no envelope id was
granted twice, and everything a client was told it got is in the ledger.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from app import protocol as p
from app.server.journal import MAGIC, VERSION, encode_record
from app.server.ledger import COUNTERS, MAX_EID
from tests import reliability
from tests.reliability import Row, ledger_diff, record
from tests.serverproc import Client
from tests.test_server import wait_for

reliability_table = reliability.reliability_table  # module fixture: prints the table


class ShakeLoad:
    """Round-robin shakes over ``users`` in a thread, reconnecting lost users."""

    def __init__(self, server, users: range) -> None:
        self.server = server
        self.users = list(users)
        self.conns: dict[int, Client | None] = dict.fromkeys(self.users)
        self.got: list[tuple[int, int, int]] = []  # (envelope id, amount, userid)
        self.codes: dict[int, int] = {}
        self.lost = 0  # requests whose connection died before the answer
        self.logged_in: set[int] = set()  # users who logged in at least once
        self.came_back: set[int] = set()  # users logged in again after losing a connection
        self.lost_by_user: dict[int, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def connection(self, u: int) -> Client:
        conn = self.conns[u]
        if conn is None:
            conn = Client(self.server.port, timeout=2)
            if conn.login(u).result != 0:
                raise ConnectionError("login refused")
            self.conns[u] = conn
            if u in self.logged_in:
                self.came_back.add(u)
            self.logged_in.add(u)
        return conn

    def run(self) -> None:
        while not self.stop.is_set():
            for u in self.users:
                if self.stop.is_set():
                    break
                try:
                    result = self.connection(u).shake()
                except (OSError, ConnectionError):
                    if self.conns[u] is not None:
                        self.conns[u].close()
                        self.lost += 1
                        self.lost_by_user[u] = self.lost_by_user.get(u, 0) + 1
                    self.conns[u] = None
                    time.sleep(0.01)
                    continue
                self.codes[result.result] = self.codes.get(result.result, 0) + 1
                if result.result == p.ShakeCode.GOT:
                    self.got.append((result.envelope_id, result.amount, u))

    def __enter__(self) -> ShakeLoad:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)
        for conn in self.conns.values():
            if conn is not None:
                conn.close()


def check_money(server, load: ShakeLoad) -> dict:
    ledger = server.stats(audit=True)["ledger"]
    ids = [eid for eid, _, _ in load.got]
    assert len(ids) == len(set(ids)), "an envelope was granted twice"
    assert ledger["balanced"], ledger
    # Every answer a client saw is in the ledger; at most the answers in flight
    # when a SET died were granted without reaching their client.
    assert ledger["granted"]["count"] - len(ids) in range(0, load.lost + 1)
    return ledger


def test_kill_9_of_one_set_under_load(server):
    server.get("/yaohongbao?qps=300&sum=600")
    with ShakeLoad(server, range(1, 81)) as load:
        wait_for(lambda: len(load.got) > 50, timeout=10)
        victim = server.stats()["per_set"][1]
        cut_off = {u for u in set(load.logged_in) if u % 4 == 1}  # SET 1's users logged in
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.time()
        wait_for(lambda: server.get("/health")["restarts"] == 1, timeout=5)
        health = server.wait_healthy(timeout=10)
        restart_seconds = time.time() - killed_at
        wait_for(lambda: server.stats()["ledger"]["generated"]["count"] == 600, timeout=15)
        wait_for(lambda: server.stats()["ledger"]["bucket"]["count"] == 0, timeout=15)
        # every user the kill cut off logs in again (first logins are not counted)
        wait_for(lambda: load.came_back >= cut_off, timeout=30)
    ledger = check_money(server, load)
    assert ledger["generated"]["count"] == 600 and ledger["waiting"]["count"] == 0
    assert ledger["granted"]["count"] == 600
    replayed = server.stats()["per_set"][1]["journal"]["replayed"]
    assert replayed["records"] > 0
    assert health["sets_alive"] == 4 and restart_seconds < 5
    assert cut_off and load.came_back >= cut_off, (cut_off, load.came_back)


def test_sigterm_flushes_every_journal_and_a_restart_resumes_exactly(start_server):
    server = start_server()
    server.get("/yaohongbao?qps=200&sum=300")
    with ShakeLoad(server, range(1, 41)) as load:
        wait_for(lambda: len(load.got) > 100, timeout=15)
        before = server.stats(audit=True)["ledger"]
        assert server.terminate() == 0
    # Same journal directory, same port: the state comes back from the journals.
    again = start_server(port=server.port)
    after = again.stats(audit=True)["ledger"]
    assert after["balanced"]
    assert after["granted"]["count"] >= before["granted"]["count"]
    ids = [eid for eid, _, _ in load.got]
    assert len(ids) == len(set(ids))
    assert after["granted"]["count"] - len(ids) in range(0, load.lost + 1)
    # The campaign goes on where it stopped: exactly 300 in all, never more.
    wait_for(lambda: again.stats()["ledger"]["generated"]["count"] == 300, timeout=10)
    c = Client(again.port)
    try:
        c.login(1)
        while c.shake().result == p.ShakeCode.GOT:
            pass
    finally:
        c.close()
    final = again.stats(audit=True)["ledger"]
    assert final["generated"]["count"] == 300 and final["balanced"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs of our own (root only), unmounted after the test."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk, leave: int) -> Path:
    """A file taking all of ``disk`` but ``leave`` bytes; removing it frees the space."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return filler


@pytest.mark.parametrize("durability", ["written", "fdatasync"])
def test_journal_write_fails_on_a_full_disk_under_load(start_server, tmp_path, tiny_disk,
                                                       durability):
    """Issue 11 item 1: ENOSPC mid-run. The SET whose write failed answers nothing more and
    exits 75; once there is room it restarts and replays; no envelope is granted twice and
    the ledger balances exactly."""
    supply = 1500
    server = start_server(sets=2, journal="disk/journal",
                          extra=["--durability", durability])
    try:
        server.get(f"/yaohongbao?qps=400&sum={supply}")
        with ShakeLoad(server, range(1, 61)) as load:
            wait_for(lambda: len(load.got) > 50, timeout=10)
            filler = fill(tiny_disk, leave=4096)  # about one page: ~300 more records
            halted = wait_for(lambda: re.search(r"SET (\d+) stops \(restartable\): journal "
                                                r"write failed", server.log_path.read_text()),
                              timeout=20)
            failed_at = len(load.got)
            filler.unlink()
            wait_for(lambda: server.get("/health")["restarts"] >= 1, timeout=10)
            server.wait_healthy(timeout=20)
            wait_for(lambda: server.stats()["ledger"]["generated"]["count"] == supply,
                     timeout=30)
            wait_for(lambda: server.stats()["ledger"]["bucket"]["count"] == 0, timeout=30)
        ledger = check_money(server, load)
        health = server.get("/health")
    finally:
        server.stop()
    assert ledger["generated"]["count"] == supply == ledger["granted"]["count"]
    assert not health["failed"] and health["restarts"] >= 1
    assert 0 < failed_at < supply
    ids = [eid for eid, _, _ in load.got]
    victim = int(halted.group(1))
    outside = sum(n for u, n in load.lost_by_user.items() if u % 2 != victim)
    assert outside == 0  # the other SET's users never noticed
    record(Row(f"journal write fails (ENOSPC), durability={durability}", faults=1,
               survived=f"{len(ids)}/{ledger['granted']['count']} grants seen",
               lost=outside, ledger_diff=ledger_diff(ledger),
               figures={"double_grants": len(ids) - len(set(ids)),
                        "in_flight_lost": load.lost - outside,
                        "restarts": health["restarts"], "grants_before_failure": failed_at}))


def test_envelope_id_exhaustion_stops_the_set_with_a_restartable_code(start_server, tmp_path):
    """Issue 11 item 5: exit 75 with a message, restarted; not 'cannot boot' (3)."""
    directory = tmp_path / "journal"
    directory.mkdir()
    counters = dict.fromkeys(COUNTERS, 0)
    counters["next_seq"] = MAX_EID - 2  # three ids left for SET 0 of 1
    (directory / "set-000.journal").write_bytes(
        encode_record(b"H", MAGIC, VERSION, 0, 1)
        + encode_record(b"K", *(counters[name] for name in COUNTERS))
        + encode_record(b"Y", 100, 10))
    server = start_server(sets=1)
    wait_for(lambda: server.get("/health")["restarts"] >= 1, timeout=10)
    log = server.log_path.read_text()
    assert "stops (restartable): SET 0: envelope ids exhausted" in log, log[-2000:]
    assert not server.get("/health")["failed"]
    # Restarted, it replays the three envelopes it made (and stops again at the next
    # tick while the campaign wants more ids: the supervisor's backoff paces that).
    ledger = wait_for(lambda: (led := server.stats(audit=True)["ledger"]).get("complete", True)
                      and led["generated"]["count"] and led,
                      timeout=15)
    assert ledger["generated"]["count"] == 3 and ledger["balanced"]
