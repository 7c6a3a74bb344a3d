"""A SET: the worker process that owns every user with ``userid % sets == set_id``.

This module is the process: boot (descriptor limit, journal replay and
compaction, listener), its main loop (the reactor, clocked: sockets and the
envelope-generation ticks, ``Reactor.start_clocked``), its greenlets
(housekeeping, control RPC), the one commit step, and shutdown. The work is
done by parts of one job each:

- ``transport``: the connections on the reactor and their buffered answers;
- ``handoff``: passing a socket to the SET that owns its user (SCM_RIGHTS);
- ``service``: shakes under the budget, claims, envelope generation, expiry;
- ``set_stats``: counters and per-second tables for ``/stats``;
- ``ledger`` + ``journal``: the money and its write-ahead record.

How a connection flows: any SET may accept it (SO_REUSEPORT spreads
accepts) through its ``Acceptor`` (``accept``, a gevent StreamServer) and
reads the LOGIN in its reactor through the connection's session; if the
user belongs to another SET the socket goes, with the bytes read after the
LOGIN, to the owner's inbox. The owner serves it for its lifetime. No
greenlet per connection: every socket sits in the SET's epoll set
(``app.reactor``).

"Journal, then answers" has one owner, ``SetWorker.commit``: after every
reactor batch, generation tick and control change it writes the journal
records of that work and only then releases the answers revealing them. A
failed write releases nothing more: the SET closes every connection and
exits with ``EXIT_RESTART``; the restarted SET replays exactly what its
clients were told.

Run by the supervisor (``app.server.supervisor``), never by hand:
``python -m app.server.set_worker --set-id K --sets S --port P --inbox FD
--outboxes FD,... --control FD --config JSON``.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import gc
import json
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections import deque

import gevent
from gevent import socket as gsocket

from app import protocol as p
from app import settings
from app.arbiter import EXIT_BOOT_ERROR, batch_scheduling
from app.metrics import system as sysmetrics
from app.metrics.statsd import FLUSH_PHASE, Metrics
from app.reactor import READ_WRITE, WRITE, Reactor, read_some
from app.server.accept import Acceptor
from app.server.handoff import READ_SIZE, HandoffRouter
from app.server.journal import (
    MAGIC,
    VERSION,
    JournalCorrupt,
    JournalRefused,
    JournalWriter,
    encode_record,
    read_journal,
    record_offsets,
    write_snapshot,
)
from app.server.ledger import IdsExhausted, Ledger, LedgerError
from app.server.service import GEN_TICKS, Service, campaign_problem
from app.server.set_stats import SetStats
from app.server.transport import HOT, Conn, Transport

log = logging.getLogger("hongbao.set")

COALESCE_FEW_MS, COALESCE_MANY_MS = 10, 50  # auto_coalesce_ms
MANY_SETS = 24  # between 11 (200k connections) and 51 (1M)
# A SET's only timers: housekeeping on the second, the statsd flush FLUSH_PHASE
# after it. Its clocked loop turns the hub after those ticks only (Reactor.start_clocked).
TIMER_TICKS = round(GEN_TICKS * FLUSH_PHASE)
EXIT_RESTART = 75  # stopped on a failed journal write or a run-time limit: restart me


LoggedIn = p.LoggedIn  # a module name: looked up once per general-path read


def auto_coalesce_ms(sets: int) -> int:
    """The SETs' read slot (``Reactor._run_clocked``) when ``coalesce_ms`` is 'auto'.

    Each wake-up of a SET costs tens of µs on a box shared by many
    processes (their caches evict each other's), so the more SETs share a
    machine the longer each gathers. Both values are whole divisors of the
    clients' tick (50 ms at 20 ticks, 100 at 10). Measured with the slots
    (README: Benchmarks): at 200k connections (11 SETs) 8 and 10 ms gave
    the same CPU and p99 (17.4-19.5 ms at 30,000/s, 69.6-86.0 at 60,000/s);
    at 1M (51 SETs, 30,000/s) 16 ms cost 22.3 µs a request at ~3,150 SET
    wake-ups a second, 25 ms 20.2 at ~2,460 and 50 ms 19.4-19.9 at ~1,650,
    for a p50 of 13.8, 15.9 and 25.6-27.6 ms.
    """
    return COALESCE_FEW_MS if sets <= MANY_SETS else COALESCE_MANY_MS


class SetHalt(Exception):
    """Stop this SET now and exit with ``EXIT_RESTART`` (the message says why)."""


class SetWorker:
    """One shard. The constructor touches nothing; ``init_process`` sets up."""

    def __init__(self, set_id: int, sets: int, port: int, inbox_fd: int,
                 outbox_fds: list[int], control_fd: int, config: dict) -> None:
        self.set_id = set_id
        self.sets = sets
        self.port = port
        self.inbox_fd = inbox_fd
        self.outbox_fds = outbox_fds
        self.control_fd = control_fd
        self.config = config
        self.stats = SetStats()
        self.pending_logins: deque[Conn] = deque()  # in accept (= deadline) order
        self.stopping = False
        self.halted = False  # a journal write failed: no answer may go out any more

    # ------------------------------------------------------------ lifecycle
    def init_process(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor handles Ctrl-C
        die_with_parent()
        self.metrics = Metrics("hongbao.server", self.config.get("statsd") or None)
        try:
            self._open_journal()
        except OSError as exc:  # e.g. a full disk: may pass, so restart rather than halt
            raise SetHalt(f"cannot write the journal in {self.config['journal_dir']}: {exc}"
                          ) from exc
        self.listener = self._listen()
        # coalesce: requests from many client processes gathered into one wake-up
        # (app.reactor, auto_coalesce_ms)
        coalesce_ms = self.config["coalesce_ms"]
        if coalesce_ms is None:
            coalesce_ms = auto_coalesce_ms(self.sets)
        self.reactor = Reactor(self._dispatch, self.commit, coalesce=coalesce_ms / 1000)
        count = self.stats.count
        self.acceptor = Acceptor(self.listener, self._on_accept, count)
        self.transport = Transport(self.reactor, count)
        self.router = HandoffRouter(self.reactor, self.inbox_fd, self.outbox_fds, count)
        self.service = Service(self.set_id, self.sets, self.config, self.ledger, self.transport,
                               self.stats, self.metrics)
        self.gc_pauses = sysmetrics.GCPauses()
        gc.callbacks.append(self.gc_pauses)
        self.loop_lag = sysmetrics.LoopLag()

    def _open_journal(self) -> None:
        directory = self.config["journal_dir"]
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"set-{self.set_id:03d}.journal")
        records, torn = read_journal(path)
        if records:
            kind, fields = records[0]
            if kind != b"H" or fields[2] != self.set_id or fields[3] != self.sets:
                raise JournalCorrupt(
                    f"{path} was written by SET {fields[2] if kind == b'H' else '?'} of "
                    f"{fields[3] if kind == b'H' else '?'}; this is SET {self.set_id} of "
                    f"{self.sets}: use a fresh --journal-dir or the same --sets")
        self._check_campaigns(path, records)
        self.ledger = Ledger(self.set_id, self.sets)
        self.ledger.replay(records)
        self.replayed = {"records": len(records), "torn_bytes": torn}
        if torn:
            log.warning("SET %d: dropped a torn journal tail of %d bytes", self.set_id, torn)
        # Compact: rewrite the journal as a snapshot of the state just rebuilt.
        header = encode_record(b"H", MAGIC, VERSION, self.set_id, self.sets)
        write_snapshot(path, [header, *self.ledger.snapshot_records()])
        self.journal = JournalWriter(path, self.config.get("durability", "written"))
        self.ledger.journal = self.journal

    def _check_campaigns(self, path: str, records: list[tuple[bytes, tuple]]) -> None:
        """Refuse to boot into a campaign these settings cannot run (not a crash loop)."""
        last = {kind: i for i, (kind, _) in enumerate(records) if kind in (b"Y", b"F")}
        for kind, i in last.items():
            why = campaign_problem(self.config, kind, records[i][1])
            if why:
                name = "shake" if kind == b"Y" else "group"
                raise JournalRefused(f"{path} at byte {record_offsets(records)[i]}: its {name} "
                                     f"campaign cannot run with these settings: {why}")

    def _listen(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # Inherited by accepted sockets on Linux: answers are small and must
        # not wait for Nagle + delayed ACK (40 ms).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self.config["host"], self.port))
        sock.listen(65535)  # capped by net.core.somaxconn
        sock.setblocking(False)
        return sock

    def run(self) -> None:
        self.init_process()
        gevent.signal_handler(signal.SIGTERM, self.stop)
        self.metrics.start()
        self.acceptor.start()
        greenlets = [
            self.reactor.start_clocked(1 / GEN_TICKS, self._on_tick, TIMER_TICKS),
            gevent.spawn(self._housekeeping_loop),
            gevent.spawn(self._control_loop),
        ]
        log.info("SET %d/%d ready: %d users' journal replayed (%s)", self.set_id, self.sets,
                 self.ledger.c["granted_count"], self.replayed)
        try:
            gevent.joinall(greenlets, raise_error=True, count=1)
        finally:
            self._shutdown()

    def stop(self) -> None:
        """SIGTERM: stop accepting, flush the journal, close every connection, exit."""
        if self.stopping:
            return
        self.stopping = True
        self.reactor.stop()

    def _shutdown(self) -> None:
        try:
            if not self.halted:
                self.commit()
                self.journal.sync()
        finally:
            self.acceptor.stop(timeout=0)  # closes the listener
            self.transport.close_all()
            self.metrics.stop()

    def commit(self) -> None:
        """Journal first, then the answers that reveal it: the only way answers go out."""
        if self.halted:
            return
        try:
            self.journal.flush()
        except OSError as exc:
            self.halted = True
            self.transport.discard()
            raise SetHalt(f"journal write failed ({exc}); answering nothing more") from exc
        self.transport.release()

    # ------------------------------------------------------------- reactor
    def _dispatch(self, events: list[tuple[int, int]]) -> None:
        transport = self.transport
        conns = transport.conns
        now = time.time()
        second = int(now)
        # Lone SHAKEs of plain connections in bulk first (app.server.fastpath), then
        # what they read that was not only SHAKEs, then the events not read.
        rest, got, shakers, sents = HOT.read_shakes(events, conns, READ_SIZE)
        if shakers:
            self.service.serve_shakes(shakers, sents, second)
        for conn, data in got:
            if data is None:
                transport.close(conn, "peer_closed")
            elif transport.is_open(conn):
                self._on_data(conn, data, second)
        for fd, mask in rest:
            conn = conns.get(fd)
            if conn is None:
                if fd == self.inbox_fd:
                    self._adopt_handoffs(second)
                elif fd in self.router.waiting:
                    self.router.drain(fd)
                continue
            if mask & READ_WRITE == WRITE:
                transport.writable(conn)
                continue
            data = read_some(fd, READ_SIZE)
            if data is None:
                transport.close(conn, "peer_closed")
                continue
            if mask & WRITE and conn.blocked:
                transport.writable(conn)
            if data:
                self._on_data(conn, data, second)

    def _on_data(self, conn: Conn, data: bytes, second: int) -> None:
        """Bytes from a connection: its session's events, served (or its LOGIN routed)."""
        try:
            requests = conn.receive(data)
        except p.ProtocolError as exc:
            self._protocol_error(conn, exc)
            return
        if requests and type(requests[0]) is LoggedIn:  # the session stops right after it
            self._route_login(conn, second)
        else:
            self.service.serve(conn, requests, second)

    def _protocol_error(self, conn: Conn, exc: p.ProtocolError) -> None:
        self.stats.count("protocol_errors")
        self.stats.count("protocol_error." + exc.reason)
        self.metrics.incr("protocol_errors")
        self.transport.close(conn, "protocol_error")

    def _on_accept(self, fd: int) -> None:
        """A new descriptor from the Acceptor: in the reactor until its LOGIN or deadline."""
        conn = Conn(fd, time.time() + self.config["login_timeout"])
        os.set_blocking(fd, False)
        self.transport.add(conn)
        self.pending_logins.append(conn)
        self.stats.count("accepted")

    def _route_login(self, conn: Conn, second: int) -> None:
        owner = conn.userid % self.sets
        if owner != self.set_id:
            self.transport.detach(conn)
            self.router.send(owner, conn.fd, conn.userid, conn.take_buffered())
            return
        self._logged_in(conn, second)
        if conn.buffered and self.transport.is_open(conn):
            self._on_data(conn, b"", second)

    def _expire_logins(self, now: float) -> None:
        """Close the connections whose LOGIN deadline (their session's) has passed."""
        pending = self.pending_logins
        while pending and pending[0].login_deadline <= now:
            conn = pending.popleft()
            if not conn.logged_in and self.transport.is_open(conn):
                self.transport.close(conn, "login_timeout")

    def _logged_in(self, conn: Conn, second: int) -> None:
        self.transport.log_in(conn)
        self.stats.count("logins")
        self.metrics.incr("logins")
        self.transport.send(conn, conn.login_result(p.LoginCode.OK, second))

    def _adopt_handoffs(self, second: int) -> None:
        """Sockets whose LOGIN another SET read: ours for their lifetime."""
        for fd, userid, rest in self.router.receive():
            conn = Conn(fd)
            conn.resume(userid)
            self.transport.add(conn)
            if userid % self.sets != self.set_id:
                self.transport.send(conn, conn.login_result(p.LoginCode.WRONG_SET, second))
                self.commit()
                self.transport.close(conn, "wrong_set")
                continue
            self._logged_in(conn, second)
            if rest:
                self._on_data(conn, rest, second)

    # ------------------------------------------------------------- loops
    def _on_tick(self, tick: int, late: float) -> None:
        """Shake and group envelopes, in ticks aligned to the wall clock (the reactor's clock)."""
        # how late the loop got to its tick: the SET's loop lag (no probe greenlet of its own)
        self.loop_lag.observe(late)
        try:
            self.service.generate(tick % GEN_TICKS, time.time())
        except IdsExhausted as exc:
            self.commit()  # what was generated before the limit is sound
            raise SetHalt(str(exc)) from exc
        self.commit()

    def _housekeeping_loop(self) -> None:
        """Once a second: login deadlines, share expiry, fsync, history, gauges.

        Due on the second, so the hub's turn after the reactor's first tick
        of that second runs it (``Reactor.start_clocked``).
        """
        while True:
            gevent.sleep(1.0 - time.time() % 1.0)
            now = time.time()
            self._expire_logins(now)
            self.service.expire(now)
            self.commit()
            lag, pause = round(self.loop_lag.take(), 3), round(self.gc_pauses.take(), 3)
            self.stats.end_second(now, self.metrics, lag, pause,
                                  round(self.gc_pauses.last_cpu_ms, 3))
            k = self.set_id
            self.metrics.gauge(f"set.{k}.connections", len(self.transport.users))
            self.metrics.gauge(f"set.{k}.loop_lag_ms", lag)
            self.metrics.gauge(f"set.{k}.gc_pause_ms", pause)
            # Long-lived objects (connections, users, envelopes) leave the cyclic
            # GC's view: a full collection then scans only the last second's
            # objects. Measured: 48 ms worst pause at 17k connections per SET
            # without this. Nothing here forms cycles, so refcounting frees them.
            gc.freeze()
            # Last: this greenlet waits for the fsync in a thread, the loop serves on.
            self.journal.sync(gevent.get_hub().threadpool.apply)

    # --------------------------------------------------------------- control
    def _control_loop(self) -> None:
        """Line-delimited JSON requests from the supervisor, answered in order."""
        sock = gsocket.socket(fileno=self.control_fd)
        reader = sock.makefile("rb")
        while True:
            line = reader.readline()
            if not line:
                log.info("SET %d: supervisor gone; stopping", self.set_id)
                self.stop()
                return
            seq = None
            try:
                request = json.loads(line)
                seq = request.get("seq")
                answer = self.handle_control(request)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                answer = {"error": f"bad control request: {exc}"}
            if seq is not None:
                answer = {**answer, "seq": seq}  # lets the supervisor skip stale answers
            sock.sendall(json.dumps(answer, separators=(",", ":")).encode() + b"\n")

    def handle_control(self, request: dict) -> dict:
        op = request["op"]
        if op == "ping":
            return {"ok": True, "set": self.set_id, "pid": os.getpid()}
        if op == "stats":
            return self.stats_answer(request.get("audit", False), int(request.get("since", 0)))
        if op == "yao":
            fields = (int(request["rate"]), int(request["sum"]))
            return self._campaign(b"Y", fields, self.ledger.set_yao)
        if op == "fa":
            fields = (int(request["rate"]), int(request["sum"]), int(request["min"]),
                      int(request["max"]))
            return self._campaign(b"F", fields, self.ledger.set_fa)
        raise ValueError(f"unknown op {op!r}")

    def _campaign(self, kind: bytes, fields: tuple, start) -> dict:
        """Journal a campaign this SET can run; refuse one it cannot, journaling nothing."""
        why = campaign_problem(self.config, kind, fields)
        if why:
            return {"error": f"refused: {why}"}
        start(*fields)
        self.commit()
        return {"ok": True}

    def stats_answer(self, audit: bool = False, since: int = 0) -> dict:
        """This SET's part of ``/stats``: per-second rows from ``since`` on."""
        ledger = self.ledger.audit() if audit else self.ledger.totals()
        return {
            "set": self.set_id,
            "pid": os.getpid(),
            "connections": len(self.transport.users),
            "sockets": len(self.transport.conns),
            **self.stats.tables(since),
            "ledger": ledger,
            "campaigns": {"yao": vars(self.ledger.yao), "fa": vars(self.ledger.fa)},
            "budget_per_second": self.service.budget,
            "journal": {"records": self.journal.records, "bytes": self.journal.bytes,
                        "replayed": self.replayed},
            "reactor": {"batches": self.reactor.batches, "events": self.reactor.events,
                        "coalesce_ms": round(self.reactor.coalesce * 1000, 3)},
        }


def die_with_parent() -> None:
    """SIGKILL this SET if the supervisor dies (Linux prctl PR_SET_PDEATHSIG).

    A SET without its supervisor has no API, no restarts and no stop: seen
    after a supervisor was SIGKILLed mid-shutdown, 51 orphaned SETs kept
    closing their 20k connections each for minutes.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the control socket's EOF still stops us


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one hongbao SET (started by the supervisor)")
    parser.add_argument("--set-id", type=int, required=True)
    parser.add_argument("--sets", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--inbox", type=int, required=True)
    parser.add_argument("--outboxes", required=True)
    parser.add_argument("--control", type=int, required=True)
    parser.add_argument("--config", required=True,
                        help="the server's settings (app.settings.to_json)")
    args = parser.parse_args(argv)
    try:  # the same table and checks as the supervisor's: a bad value cannot crash-loop us
        config = settings.from_json("server", args.config)
    except (settings.SettingError, ValueError) as exc:
        sys.stderr.write(f"SET {args.set_id} cannot boot: bad settings: {exc}\n")
        return EXIT_BOOT_ERROR
    logging.basicConfig(level=config.log_level.upper(),
                        format=f"%(asctime)s set-{args.set_id} %(levelname)s %(message)s")
    batch_scheduling()
    worker = SetWorker(args.set_id, args.sets, args.port, args.inbox,
                       [int(fd) for fd in args.outboxes.split(",")], args.control, config)
    return run_worker(worker)


def run_worker(worker: SetWorker) -> int:
    """Run a SET to its end; the exit code tells the supervisor whether to restart it."""
    try:
        worker.run()
    except SetHalt as exc:
        log.error("SET %d stops (restartable): %s", worker.set_id, exc)
        return EXIT_RESTART
    except (JournalCorrupt, JournalRefused, LedgerError) as exc:
        log.error("SET %d cannot boot: %s", worker.set_id, exc)
        return EXIT_BOOT_ERROR
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            log.error("SET %d cannot listen: %s", worker.set_id, exc)
            return EXIT_BOOT_ERROR
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
