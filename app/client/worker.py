"""One client-agent process: up to ~19,000 connections, paced on wall-clock ticks.

Run by the agent (``app.client``), never by hand:
``python -m app.client.worker '<json spec>'``. The spec names the host's
user positions ``[0, n)``, the part ``[begin, end)`` this process owns, the
server, source addresses and pacing. The parent talks to it through pipes:

- stdin, one JSON object a line: ``{"qps": Q, "tick": K}`` (host-wide QPS
  from absolute tick ``K`` = ``unix_time * ticks``; the latest change due
  wins), ``{"coverage": true}`` or ``{"stop": true}``. A line that is not
  such an object is logged and ignored. End of file means the parent is
  gone: the worker exits.
- stdout, one JSON object a line, once per wall-clock second: what was sent
  (by the second stamped in the frames), answered (by the second they
  arrived in), results by code, the latency histogram, claims, logins,
  reconnects and connections now up.

Two greenlets: the pacer (the tick loop), which also reads the sockets and
the control input at each tick while it ticks, and the reactor's, which
wakes on them while the pacer is idle. While it ticks the pacer sleeps in
a blocking epoll of its own, not through the gevent hub (``_block_until``).
The worker fails loudly: if either dies, the process ends with
``EXIT_DIED`` and the agent restarts it like a dead SET.

State (all in this module's ``Worker``): one ``Conn`` record per owned user,
an fd -> record dict for the reactor, a heap of connection attempts due,
and the per-second counters. Nothing here is O(connections) per second:
a tick touches the users it asks, the connections that answered and the
attempts that are due.
"""

from __future__ import annotations

import errno
import heapq
import json
import logging
import os
import random
import resource
import select
import signal
import socket
import sys
import time
from typing import Any

import gevent
from gevent.event import Event

from app.arbiter import EXIT_BOOT_ERROR, batch_scheduling
from app.client import fastpath
from app.client.fastpath import SERVED
from app.client.histogram import Histogram
from app.client.schedule import Timeline, clip, quiet_ticks, tick_span
from app.protocol import (
    ClaimResult,
    ClientSession,
    EnvelopePush,
    LoginResult,
    ProtocolError,
    ShakeCode,
    ShakeResult,
)
from app.reactor import (
    READ,
    READ_WRITE,
    SO_TIMESTAMPNS,
    Reactor,
    close_fd,
    hub_epoll,
    read_some,
    sleep_serving_hub,
    write_some,
)

log = logging.getLogger("hongbao.client.worker")

IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h; bind() then defers the port choice to connect()
FD_RESERVE = 64  # descriptors kept free for the epoll, pipes and the odd HTTP request
EXIT_DIED = 1  # the reactor or the pacer greenlet died: the parent restarts us

BACKOFF_BASE = 0.5  # seconds; first retry after a loss waits uniform(0, 0.5)
BACKOFF_CAP = 5.0  # seconds; the longest a retry waits (the connect-rate bucket bounds the rate;
# with 30 s, users that failed 4 times while a server restarted took 25 s to come back)
LOGIN_TIMEOUT = 10.0  # seconds from connect() to LOGIN_RESULT before we give up
# Attempts between connect() and LOGIN_RESULT, per process. Closed-loop flow
# control: a rate alone kept connecting faster than 11 SETs could accept, the
# accept queues filled with connections whose login timed out, and each retry
# added to the queue (measured: 5.5M failed attempts, 49k of 200k logged in
# after 5 min). With a cap, attempts go at the speed logins come back.
# Capped further at 2 s of this process's connect rate: with 68 workers on one
# machine, 1000 each was still 68k logins queued behind a server that accepts
# ~7k/s, i.e. past the login timeout.
MAX_IN_FLIGHT = 1000
# Seconds the process sleeps after a batch of answers before polling again
# (app.reactor), while it wakes on their arrival (not ticking: connecting,
# idle): answers from many SETs arriving at different moments are read in one
# wake-up. While it ticks it does not wake on arrivals at all: the pacer reads
# everything ready at each tick (``Worker.pace``). Measured at 200k connections,
# 17 hosts, 11 SETs, 30,000/s: 13,238 client wake-ups a second with none, 2,613
# with 5 ms, ~1,200 with 10 ms; reading at the ticks leaves about one per tick.
# Latency and the second an answer counts in come from the kernel's receive
# stamp, so neither includes the wait.
COALESCE = 0.010
# A process stops asking once this many seconds of its rate are unanswered
# (the asks are skipped and counted as busy). Per user one SHAKE is already
# the limit, but at one million users that still let ~1M sockets each hold an
# unread request, and every such socket pins at least a page of the kernel's
# global TCP memory: measured, tcp_mem (575,796 pages) ran out within seconds
# of a 30,000/s phase the SETs could not keep up with.
OUTSTANDING_SECONDS = 1.0
MIN_OUTSTANDING = 100
MAX_CATCH_UP = 2  # seconds of missed ticks we still send (stamped with their own second)
# A pacer at least this far behind a tick has stalled: counted with the process's own CPU
# over the stretch (``Worker.note_lag``), which tells a worker busy with its own work
# from one that waited for a CPU.
STALL_S = 0.100


def outstanding_cap(host_qps: int) -> int:
    """Unanswered SHAKEs at which a process stops asking: a second of its *host's* rate.

    Not of its own share: the window of a second is contiguous in the host's
    user positions, so while the rate is below a process's users the whole
    second can fall in one process's range (at 1M, 3 processes a host: one
    sends the host's 1,765/s, the others nothing). Capped at a third of that,
    a process that caught up after a stall hit the cap and skipped its users
    (9,633 and 42,375 asks skipped in two one-million runs, each failing
    second short by exactly its skips). The bound stays: 17 hosts x 3
    processes x a second of a host's rate is 3 s of the fleet's rate.
    """
    return max(MIN_OUTSTANDING, int(host_qps * OUTSTANDING_SECONDS))


DOWN, CONNECTING, LOGGING_IN, READY = range(4)
ERROR_EVENTS = select.EPOLLERR | select.EPOLLHUP
_READABLE = select.EPOLLIN | ERROR_EVENTS | select.EPOLLRDHUP
_GOT = int(ShakeCode.GOT)
# Bytes read per ready socket and batch: a few answers (28 B each). 64 KB made
# every read allocate 64 KB and shrink it; what is left comes next batch.
READ_SIZE = 4096


def _until(by_second: dict[int, int], second: int) -> int:
    """Pop and sum the counts of ``second`` and earlier: answers not yet reported.

    Answers are counted by the wall-clock second they arrived in (the
    kernel's receive stamp, ``app.client.fastpath``; the rare answer that
    goes the general way, by when it was read), not by when the pacer gets
    to write the report: a report written 50 ms late (a stalled process)
    used to count the next second's first 50 ms in this one. Seconds whose
    report was skipped (a pacer more than ``MAX_CATCH_UP`` late) fold into
    this one.
    """
    total = 0
    for s in [s for s in by_second if s <= second]:
        total += by_second.pop(s)
    return total


class Conn:
    """One user's connection; ``sent_at`` is the send time of its unanswered SHAKE (0: none).

    Closed loop: a user is asked again only once its previous SHAKE was
    answered (``Worker.run_tick`` skips and counts it otherwise), so one float
    is all the in-flight state a user needs.

    ``session`` (the protocol's rules, ``app.protocol.session``) is new for each
    connection attempt and None while the user is down.
    """

    __slots__ = ("pos", "userid", "fd", "state", "out", "session", "sent_at", "attempt", "since",
                 "asks", "asked")

    def __init__(self, pos: int, userid: int) -> None:
        self.pos = pos
        self.userid = userid
        self.fd = -1
        self.state = DOWN
        self.out = b""
        self.session: ClientSession | None = None
        self.sent_at = 0.0
        self.attempt = 0
        self.since = 0.0
        self.asks = 0  # SHAKEs sent for this user, and the second of the last one
        self.asked = 0  # (read only by the on-demand coverage report)


# The bulk SHAKE path over these records: compiled when built (app.client.fastpath)
HOT = fastpath.implementation(Conn, READY)


class Worker:
    """Connections, pacing and per-second reports of one process."""

    def __init__(self, spec: dict[str, Any], control_fd: int | None = None) -> None:
        self.index: int = spec["index"]
        self.first: int = spec["first"]  # userid of position 0
        self.n: int = spec["n"]  # positions of the whole host
        self.begin: int = spec["begin"]
        self.end: int = spec["end"]
        host, port = spec["server"]
        self.server = (host, int(port))
        self.sources: list[str] = list(spec.get("sources") or [])
        self.ticks: int = spec["ticks"]
        self.pacing: str = spec["pacing"]
        self.quiet = quiet_ticks(self.ticks, spec.get("quiet_ms", 0))  # the second's end: none
        # host QPS by tick: the change in effect now and later ones, each applied at its tick
        self.timeline = Timeline(spec.get("changes") or [(0, spec.get("qps", 0))])
        self.qps = 0
        self.connect_rate: float = spec["connect_rate"]  # attempts per second, this process
        self.max_in_flight = max(50, min(MAX_IN_FLIGHT, int(2 * self.connect_rate)))
        self.conns = [Conn(p, self.first + p) for p in range(self.begin, self.end)]
        self.by_fd: dict[int, Conn] = {}
        self.due: list[tuple[float, int]] = [(0.0, p) for p in range(self.begin, self.end)]
        self.pending: dict[int, Conn] = {}  # connecting or logging in, for the timeout
        self.tokens = 0.0  # token bucket of connect attempts, burst of rate/10
        self.refilled = time.time()
        self.ready = 0
        self.reactor = Reactor(self._dispatch, coalesce=COALESCE)
        self.outstanding = 0  # SHAKEs sent and not yet answered, all users of this process
        self.answered: dict[int, int] = {}  # answers by the second they arrived in
        self.served: dict[int, int] = {}  # ... of them GOT or NONE_LEFT (they served the ask)
        self.wake = Event()
        self.stdin = sys.stdin.fileno() if control_fd is None else control_fd
        self.ctl_buf = b""
        self.last_tick = 0
        self.last_cpu = 0.0  # process CPU seconds at the previous wake-up (note_lag)
        self.expired_second = 0  # the second whose login timeouts were last checked
        self.stopping = False
        self.died = ""  # why a greenlet of ours died (the process then exits EXIT_DIED)
        self._reset_counters()

    # --- per-second counters -------------------------------------------------
    def _reset_counters(self) -> None:
        self.sent: dict[int, int] = {}  # by stamped second
        # sent only once their second had ended (a pacer that late): they cannot
        # arrive within it, so the server's count for it falls short by them
        self.sent_late: dict[int, int] = {}
        self.skipped: dict[int, int] = {}  # asked while that user's connection was down, or
        # while its previous SHAKE was still unanswered (closed loop: those also in busy)
        self.busy = 0
        self.results: dict[int, int] = {}
        self.hist = Histogram()
        self.claims_sent = 0
        self.claims_granted = 0
        self.claim_amount = 0
        self.shake_amount = 0
        self.logins = 0
        self.reconnects = 0
        self.connect_failures = 0
        self.connects = 0  # attempts started (bounded by connect_rate)
        self.lost = 0  # SHAKEs unanswered when their connection died
        self.errors = 0
        self.lag = 0.0  # worst lateness of a tick behind its wall-clock time (loop lag)
        self.stalls = 0  # wake-ups STALL_S or more behind their tick ...
        self.stall_ms = 0.0  # ... how late they were in all ...
        self.stall_cpu_ms = 0.0  # ... and this process's CPU over their stretches
        self.ticks_skipped = 0  # ticks more than MAX_CATCH_UP late, not sent (starved CPU)

    def report(self, second: int) -> None:
        """Write second ``second``'s record to the parent and start the next."""
        record = {
            "p": self.index, "t": second, "sent": self.sent.pop(second, 0),
            "sent_late": self.sent_late.pop(second, 0),
            "skipped": self.skipped.pop(second, 0),
            "answered": _until(self.answered, second), "served": _until(self.served, second),
            "results": {str(k): v for k, v in self.results.items()},
            "hist": self.hist.to_json(), "claims_sent": self.claims_sent,
            "claims_granted": self.claims_granted, "claim_amount": self.claim_amount,
            "shake_amount": self.shake_amount, "logins": self.logins,
            "reconnects": self.reconnects, "connect_failures": self.connect_failures,
            "connects": self.connects, "ticks_skipped": self.ticks_skipped,
            "lost": self.lost, "errors": self.errors, "connections": self.ready,
            "busy": self.busy,
            "qps": self.qps, "lag_ms": round(self.lag * 1000, 3), "stalls": self.stalls,
            "stall_ms": round(self.stall_ms, 3), "stall_cpu_ms": round(self.stall_cpu_ms, 3),
        }
        sent, skipped, late = self.sent, self.skipped, self.sent_late
        self._reset_counters()
        self.sent, self.skipped, self.sent_late = sent, skipped, late  # later seconds stay
        sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
        sys.stdout.flush()


    def _count_answer(self, result: int, now: float) -> None:
        """One answer read the general way, by the second it was read in (see ``_until``)."""
        second = int(now)
        self.answered[second] = self.answered.get(second, 0) + 1
        if result in SERVED:
            self.served[second] = self.served.get(second, 0) + 1

    # --- connections ----------------------------------------------------------
    def connect(self, conn: Conn, now: float) -> None:
        self.connects += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # answers stamped on arrival (app.reactor.read_stamped): the server's
            # latency, not also this process's wait for a CPU
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            if self.sources:
                sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((self.sources[conn.pos % len(self.sources)], 0))
            err = sock.connect_ex(self.server)
        except OSError as exc:
            sock.close()
            log.debug("connect setup failed: %s", exc)
            self._retry(conn, now)
            return
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._retry(conn, now)
            return
        conn.fd = sock.detach()
        conn.state = CONNECTING
        conn.session = ClientSession(conn.userid)
        conn.since = now
        self.by_fd[conn.fd] = conn
        self.pending[conn.pos] = conn
        self.reactor.register(conn.fd, READ_WRITE)

    def _retry(self, conn: Conn, now: float, failed: bool = True) -> None:
        """Schedule the next attempt: exponential backoff with full jitter."""
        self.connect_failures += failed
        conn.attempt += 1
        delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** conn.attempt))
        heapq.heappush(self.due, (now + delay, conn.pos))

    def drop(self, conn: Conn, now: float) -> None:
        """Close a connection and schedule its comeback (no synchronized stampede)."""
        was_up = conn.state == READY
        if was_up:
            self.ready -= 1
            self.reconnects += 1  # a logged-in connection lost: it comes back
        self.reactor.unregister(conn.fd)
        close_fd(conn.fd)
        self.by_fd.pop(conn.fd, None)
        self.pending.pop(conn.pos, None)
        if conn.sent_at:
            self.lost += 1
            self.outstanding -= 1
        conn.fd, conn.state, conn.out, conn.session, conn.sent_at = -1, DOWN, b"", None, 0.0
        self._retry(conn, now, failed=not was_up)

    def _connect_due(self, now: float) -> None:
        """Start the attempts that are due, no faster than ``connect_rate``."""
        # refilled by elapsed time, not per tick: a late pacer must not slow connecting
        elapsed, self.refilled = now - self.refilled, now
        self.tokens = min(self.tokens + self.connect_rate * max(0.0, elapsed),
                          max(1.0, self.connect_rate / 10))
        due = self.due
        pending = self.pending
        while due and due[0][0] <= now and self.tokens >= 1 and len(pending) < self.max_in_flight:
            _, pos = heapq.heappop(due)
            conn = self.conns[pos - self.begin]
            if conn.state == DOWN:
                self.tokens -= 1
                self.connect(conn, now)

    def _expire_logins(self, now: float) -> None:
        late = [c for c in self.pending.values() if now - c.since > LOGIN_TIMEOUT]
        for conn in late:
            self.drop(conn, now)

    def send(self, conn: Conn, data: bytes, now: float) -> None:
        if conn.out:
            conn.out += data
            return
        rest = write_some(conn.fd, data)
        if rest is None:
            self.drop(conn, now)
        elif rest:
            conn.out = rest
            self.reactor.modify(conn.fd, READ_WRITE)

    # --- events ---------------------------------------------------------------
    def _dispatch(self, events: list[tuple[int, int]]) -> None:
        now = time.time()
        # Lone SHAKE_RESULTs of plain connections counted in bulk (app.client.fastpath),
        # then what was read that was not only those, then the events not read.
        rest, got, _, amount, released = HOT.read_answers(
            events, self.by_fd, READ_SIZE, now, self.hist, self.results, self.answered,
            self.served)
        self.shake_amount += amount
        self.outstanding -= released
        for conn, data in got:
            if data is None:
                self.drop(conn, now)
            else:
                self._on_data(conn, data, now)
        by_fd = self.by_fd
        for fd, mask in rest:
            conn = by_fd.get(fd)
            if conn is None:
                if fd == self.stdin:
                    self._control()
                continue
            if conn.state == CONNECTING:
                if mask & ERROR_EVENTS:
                    self.drop(conn, now)
                    continue
                conn.state = LOGGING_IN
                self.reactor.modify(fd, READ)
                self.send(conn, conn.session.login(int(now)), now)
                continue
            if mask & select.EPOLLOUT and conn.out:
                rest_out = write_some(fd, conn.out)
                if rest_out is None:
                    self.drop(conn, now)
                    continue
                conn.out = rest_out
                if not rest_out:
                    self.reactor.modify(fd, READ)
            if mask & _READABLE:
                data = read_some(fd, READ_SIZE)
                if data is None:
                    self.drop(conn, now)
                elif data:
                    self._on_data(conn, data, now)

    def _on_data(self, conn: Conn, data: bytes, now: float) -> None:
        try:
            self._frames(conn, data, now)
        except ProtocolError as exc:
            log.warning("user %d: %s", conn.userid, exc)
            self.errors += 1
            self.drop(conn, now)

    def _frames(self, conn: Conn, data: bytes, now: float) -> None:
        """The server's frames, through the connection's session (raises ProtocolError)."""
        for frame in conn.session.receive(data):
            kind = type(frame)
            if kind is ShakeResult:
                result = frame.result
                self._count_answer(result, now)
                self.results[result] = self.results.get(result, 0) + 1
                if result == _GOT:
                    self.shake_amount += frame.amount
                if conn.sent_at:
                    self.hist.record(int((now - conn.sent_at) * 1e6))
                    conn.sent_at = 0.0
                    self.outstanding -= 1
            elif kind is EnvelopePush:
                self.claims_sent += 1
                self.send(conn, conn.session.claim(frame.envelope_id, int(now)), now)
                if conn.fd < 0:
                    return  # dropped while sending the claim
            elif kind is ClaimResult:
                if frame.amount:
                    self.claims_granted += 1
                    self.claim_amount += frame.amount
            elif kind is LoginResult and conn.state == LOGGING_IN:
                conn.state = READY
                conn.attempt = 0
                self.ready += 1
                self.logins += 1
                self.pending.pop(conn.pos, None)

    def _control(self) -> None:
        data = read_some(self.stdin, 65536)
        if data is None:
            self.stopping = True  # the parent is gone
            return
        self.ctl_buf += data
        *lines, self.ctl_buf = self.ctl_buf.split(b"\n")
        for line in lines:
            if line.strip():
                try:
                    self._command(json.loads(line))
                except (ValueError, TypeError, AttributeError) as exc:
                    log.warning("ignoring control line %r: %s", line[:80], exc)

    def _command(self, msg: dict[str, Any]) -> None:
        """One control message (raises ValueError/TypeError/AttributeError when malformed)."""
        if msg.get("stop"):
            self.stopping = True
            self.wake.set()
        elif msg.get("coverage"):
            self.coverage()
        elif "qps" in msg:
            qps, tick = int(msg["qps"]), int(msg.get("tick", 0))
            if qps < 0:
                raise ValueError("negative qps")
            self.timeline.add(tick, qps)
            self.wake.set()  # an idle pacer sleeps to the next second: wake it now
        else:
            raise ValueError("neither stop, coverage nor qps")

    def coverage(self) -> None:
        """Report how evenly users were asked: O(connections), so only on request."""
        asks = [c.asks for c in self.conns]
        record = {"p": self.index, "coverage": {
            "users": len(asks), "never": asks.count(0),
            "asks_min": min(asks, default=0), "asks_max": max(asks, default=0),
            "oldest_second": min((c.asked for c in self.conns), default=0)}}
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()

    # --- pacing ---------------------------------------------------------------
    def run_tick(self, tick: int, now: float) -> None:
        """Send this process's part of the window slice of absolute ``tick``."""
        self.qps = self.timeline.at(tick)
        second, k = divmod(tick, self.ticks)
        if k == 0:
            self.report(second - 1)
        start, count = tick_span(second, k, self.qps, self.n, self.ticks, self.pacing,
                                 self.quiet)
        if not count:
            return
        conns, base, sent, skipped, busy = self.conns, self.begin, 0, 0, 0
        outstanding = self.outstanding
        cap = outstanding_cap(self.qps)
        for lo, hi in clip(start, count, self.n, self.begin, self.end):
            n_sent, n_skipped, n_busy, outstanding = HOT.send_shakes(
                conns[lo - base:hi - base], second, now, cap, outstanding, self.send)
            sent += n_sent
            skipped += n_skipped
            busy += n_busy
        self.outstanding = outstanding
        if sent:
            self.sent[second] = self.sent.get(second, 0) + sent
            if now >= second + 1:
                self.sent_late[second] = self.sent_late.get(second, 0) + sent
        if skipped or busy:
            self.skipped[second] = self.skipped.get(second, 0) + skipped + busy
            self.busy += busy

    def note_lag(self, late: float, cpu: float) -> None:
        """A ticking wake-up ``late`` s behind its tick, the process's CPU seconds ``cpu`` now.

        The stretch since the previous wake-up (its ticks, the sleep, this
        drain) is a stall when the pacer is ``STALL_S`` behind; its CPU over
        the stretch says why. Measured at one million connections and
        40,000/s: 417 of 460 stretches 200 ms or more late had used under
        10 ms of the worker's CPU (median 6 ms): it had waited for a CPU.
        """
        self.lag = max(self.lag, late)
        if late >= STALL_S:
            self.stalls += 1
            self.stall_ms += late * 1000
            self.stall_cpu_ms += (cpu - self.last_cpu) * 1000
        self.last_cpu = cpu

    def idle(self, next_tick: float) -> bool:
        """True when the ticks until the next second would do nothing."""
        return (not self.qps and not self.timeline.pending(self.last_tick) and not self.pending
                and not (self.due and self.due[0][0] <= next_tick + 1.0))

    def pace(self) -> None:
        """The tick loop: sleep to the next wall-clock tick, run every tick now due."""
        ticks = self.ticks
        self.last_tick = int(time.time() * ticks)
        self.qps = self.timeline.at(self.last_tick)  # a restarted worker: what applies now
        while not self.stopping:
            now = time.time()
            next_tick = (int(now * ticks) + 1) / ticks
            was_idle = self.idle(next_tick)
            self._watch(was_idle)
            if was_idle:
                # Nothing to send or connect: wake once a second (for the report)
                # or on a control message, not 100 times. Measured: 68 idle
                # workers holding 1M connections cost ~1 core at 100 wake-ups/s.
                self.wake.clear()
                self.wake.wait(max(0.0, int(now) + 1 - now))
            else:
                self._block_until(next_tick)
            if not was_idle:
                self.reactor.drain()  # before the ticks: a report counts what arrived
            now = time.time()
            current = int(now * ticks)
            if not was_idle:  # after an idle sleep, late ticks are by design
                self.note_lag(now - (self.last_tick + 1) / ticks, time.process_time())
            else:
                self.last_cpu = time.process_time()
            if current - self.last_tick > MAX_CATCH_UP * ticks:
                log.warning("process %d: %d ticks late, skipping them",
                            self.index, current - self.last_tick)
                self.ticks_skipped += current - 1 - self.last_tick
                self.last_tick = current - 1
            for tick in range(self.last_tick + 1, current + 1):
                self.last_tick = tick
                self.run_tick(tick, now)
            self._connect_due(now)
            if current // ticks != self.expired_second:  # once a second, even if woken late
                self.expired_second = current // ticks
                self._expire_logins(now)

    def _block_until(self, deadline: float) -> None:
        """Sleep to the tick ``deadline`` without a wake-up through the gevent hub.

        A ticking worker wakes 10-20 times a second for nothing else (see
        ``app.reactor.sleep_serving_hub``); a gevent socket that turns ready
        still gets its greenlet run at once, and the hub's timers and
        callbacks (nothing of the worker's own while it ticks) run at the
        first tick of every second.
        """
        sleep_serving_hub(self.hub_poll, deadline)
        if round(deadline * self.ticks) % self.ticks == 0:
            gevent.idle()

    def _watch(self, on: bool) -> None:
        """Wake on socket events (idle: control lines, late answers), or not (ticking).

        While the pacer ticks it reads whatever is ready at each tick
        (``Reactor.drain``): one wake-up a tick instead of one per burst of
        answers. Idle, it sleeps up to a second, so the reactor's greenlet
        watches the sockets and the control pipe again.
        """
        if on and not self.reactor.watching:
            self.reactor.start().link_exception(self._greenlet_died)
        elif not on and self.reactor.watching:
            self.reactor.stop()

    def run(self) -> int:
        """Serve until told to stop (0) or until one of our greenlets dies (``EXIT_DIED``)."""
        os.set_blocking(self.stdin, False)
        self.reactor.register(self.stdin, READ)
        self.hub_poll = hub_epoll()  # the pacer's sleep (_block_until)
        self._watch(True)
        self.pacer = pacer = gevent.spawn(self.pace)
        pacer.name = "pacer"
        pacer.link_exception(self._greenlet_died)
        try:
            pacer.join()
            if pacer.exception is not None and not self.died:
                self._greenlet_died(pacer)
        finally:
            pacer.kill()
            self.hub_poll.close()
            self.reactor.close()
            for conn in self.conns:
                if conn.fd >= 0:
                    close_fd(conn.fd)
        return EXIT_DIED if self.died else 0

    def _greenlet_died(self, greenlet: gevent.Greenlet) -> None:
        if self.died:
            return
        self.died = f"{greenlet.name} greenlet died: {greenlet.exception!r}"
        log.error("process %d: %s; exiting %d", self.index, self.died, EXIT_DIED)
        self.stopping = True
        self.wake.set()


def raise_fd_limit(needed: int) -> None:
    """Lift the soft descriptor limit to the hard one; exit if even that is too small."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if needed + FD_RESERVE > hard:
        sys.stderr.write(f"need {needed + FD_RESERVE} descriptors, hard limit is {hard}\n")
        sys.exit(EXIT_BOOT_ERROR)  # the agent halts instead of restarting us forever


def main(argv: list[str] | None = None) -> None:
    """Entry point of one worker process (spawned by ``app.client``)."""
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    logging.basicConfig(level=spec.get("log_level", "info").upper(), stream=sys.stderr,
                        format=f"%(asctime)s client.p{spec['index']} %(levelname)s %(message)s")
    raise_fd_limit(spec["end"] - spec["begin"])
    batch_scheduling()
    # Ctrl-C reaches the whole process group; the agent decides when we stop
    # (a "stop" line or the end of stdin), so a terminal's SIGINT is ignored.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(Worker(spec).run())


if __name__ == "__main__":
    main()
