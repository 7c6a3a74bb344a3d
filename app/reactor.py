"""Many sockets, one gevent watcher: an epoll set polled in batches by one greenlet.

Why not a greenlet (or a gevent watcher) per connection: a parked greenlet
costs ~8-10 KB here and a libev watcher plus its Python wrapper several
hundred bytes, and every readiness pays a hub switch. A SET or a client
process instead keeps its connections in its own ``select.epoll``; gevent
watches only that epoll descriptor. When it turns readable one greenlet
polls it without blocking and handles every ready descriptor in one batch —
one hub wake-up per batch, not per request, and an idle connection costs
only its kernel socket and a small record in the caller's dict.

Sockets are plain non-blocking descriptors (ints) read and written with
``os.read``/``os.write``: no socket object per connection.

Level-triggered on purpose: a reader that leaves bytes behind (a read that
filled its buffer) gets the socket again in the next batch. Edge-triggered
was tried and measured no cheaper (200k connections at 30,000/s: 17.3-17.6
+ 16.5-16.9 µs a request against 16.9-17.2 + 15.8-16.1), and the kernel's
share per request already equals the C floor's (``perf``, same run).
"""

from __future__ import annotations

import _socket
import errno
import os
import select
import struct
import time
from collections.abc import Callable, Iterator

import gevent
from gevent.hub import get_hub

READ = select.EPOLLIN | select.EPOLLRDHUP
WRITE = select.EPOLLOUT
READ_WRITE = READ | WRITE
MAX_EVENTS = 4096  # per batch; the rest are polled again after one turn of the gevent loop
LOOP_TURN = 1e-4  # s; a positive sleep goes through a whole turn of the loop (see _run)

SO_TIMESTAMPNS = 35  # asm-generic/socket.h; also the control message's type
_TIMESPEC = struct.Struct("=qq")
STAMP_SPACE = _socket.CMSG_SPACE(_TIMESPEC.size)

# errnos that mean "the peer is gone", not "we are broken"
GONE = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT,
                  errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.EBADF})


class Reactor:
    """An epoll set whose ready events are delivered in batches to ``dispatch``.

    ``dispatch(events)`` receives the list of ``(fd, eventmask)`` of one poll
    and runs in the reactor's greenlet; it must not block. ``after_batch()``
    (optional) runs after every dispatch — the place to flush journals and
    queued writes once per loop turn.

    ``coalesce`` (seconds): once the epoll turns readable the whole process
    sleeps that long before it polls (``start``; ``start_clocked`` reads at
    the next wall-clock slot of that length instead, see ``_run_clocked``),
    so what arrives meanwhile is one batch:
    at most 1/coalesce wake-ups a second however many peers write at
    different moments (68 client processes and 51 SETs woke each other tens
    of thousands of times a second). Before the first poll, not after each
    batch: a peer's burst (a client worker's tick) wakes the process with its
    first byte, and a reactor that read at once answered a burst a request
    or two at a time. The sleep blocks instead of yielding to
    the hub on purpose: a hub turn while the epoll is readable but unwatched
    makes libev drop it from its own epoll and add it back, and adding an
    epoll that holds ~15k sockets costs ~1.8 ms of kernel time (measured).
    Other greenlets of the process run at most ``coalesce`` late.

    Two ways to run it: ``start`` (a greenlet the hub wakes: client workers,
    which also ``drain`` it at their ticks) and ``start_clocked`` (the
    process's main loop, with ticks of its own: SETs).
    """

    def __init__(self, dispatch: Callable[[list[tuple[int, int]]], None],
                 after_batch: Callable[[], None] | None = None, coalesce: float = 0.0) -> None:
        self.epoll = select.epoll()
        self.dispatch = dispatch
        self.after_batch = after_batch
        self.coalesce = coalesce
        self.batches = 0
        self.events = 0
        self._greenlet: gevent.Greenlet | None = None
        self._watcher = None

    def register(self, fd: int, mask: int = READ) -> None:
        self.epoll.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self.epoll.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass  # already gone with its descriptor

    def start(self) -> gevent.Greenlet:
        self._greenlet = gevent.spawn(self._run)
        self._greenlet.name = "reactor"
        return self._greenlet

    def start_clocked(self, period: float, on_tick: Callable[[int, float], None],
                      timer_ticks: int = 1) -> gevent.Greenlet:
        """Run as the process's main loop, blocking in this epoll: the hub runs only when needed.

        ``on_tick(tick, late)`` runs at every multiple ``tick`` of ``period``
        on the wall clock (``late``: seconds after it was due), in the
        reactor's greenlet. The hub's timers run after every tick that is a
        multiple of ``timer_ticks``: the owner puts its timers on those
        ticks' times (a SET: the second and the half second). See
        ``_run_clocked`` for why.
        """
        self._greenlet = gevent.spawn(self._run_clocked, period, on_tick, timer_ticks)
        self._greenlet.name = "reactor"
        return self._greenlet

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None

    def close(self) -> None:
        self.stop()
        self.epoll.close()

    @property
    def watching(self) -> bool:
        """True while the reactor's greenlet wakes on the epoll (``start``ed, not ``stop``ped)."""
        return self._greenlet is not None

    def drain(self) -> int:
        """Handle every event ready now, without waiting; return how many there were.

        For an owner that wakes on its own clock and reads then (a client
        worker at each tick, with the greenlet ``stop``ped): no wake-up per
        arrival, and nothing else turns the loop in between.
        """
        total = 0
        while True:
            n = self._batch()
            total += n
            if n < MAX_EVENTS:
                return total

    def _batch(self) -> int:
        """Poll once without waiting and dispatch what is ready; return the event count."""
        events = self.epoll.poll(0, MAX_EVENTS)
        self._dispatch_batch(events)
        return len(events)

    def _dispatch_batch(self, events: list[tuple[int, int]]) -> None:
        if events:
            self.batches += 1
            self.events += len(events)
            self.dispatch(events)
            if self.after_batch is not None:
                self.after_batch()

    def _run_clocked(self, period: float, on_tick: Callable[[int, float], None],
                     timer_ticks: int) -> None:
        """``start_clocked``'s loop: one blocking ``epoll_wait`` per wake-up, the hub on demand.

        Why: a wake-up through gevent's hub (libev's poll, a watcher, two
        greenlet switches, a timer per sleep) cost a SET ~60 µs more CPU than
        a plain blocking call once the box's other processes had evicted its
        caches (measured: a gevent.sleep wake-up 84 µs, a time.sleep one 27);
        at 1M connections 51 SETs wake ~3,000 times a second. Here the
        process blocks in its own epoll, which also holds the hub's (libev's
        backend descriptor: readable when a gevent watcher's socket is — the
        control channel, the listener, a signal, the thread pool). The hub
        gets a turn when that is ready and after every ``timer_ticks``-th
        tick (its timers run then: on time if due on that tick, else up to
        ``timer_ticks`` periods late; a turn costs ~60-100 µs on the loaded
        box, and a SET's only timers are due on the second and the half);
        ticks run inline, with no greenlet of their own. A turn is
        ``gevent.idle()``: the hub polls without blocking and returns once
        nothing else is pending, the greenlets its sockets woke having run
        (``gevent.sleep(1e-4)`` blocked ~1 ms in libev's poll, a second
        wake-up per tick; a zero timer fired before the woken greenlets ran).

        Coalescing here is by slots of the wall clock, ``coalesce`` long,
        each starting half a slot after a multiple of ``coalesce``: once a
        socket is readable the sockets are read at the next slot start, and
        while reads find something the next read is simply the next slot
        start, without a wake-up on the sockets in between (only the hub's
        descriptor is watched then). So a loaded SET wakes once a slot, not
        twice (woken, then gathering); an idle one wakes only for its ticks.
        The clients tick on whole multiples of the slot (10 or 20 ticks a
        second; ``auto_coalesce_ms``), so a read comes half a slot after the
        burst of a tick starts, not at its first byte.
        """
        hub_fd = get_hub().loop.fileno()
        hub_event = (hub_fd, select.EPOLLIN)
        self.epoll.register(hub_fd, select.EPOLLIN)
        hub_only = hub_epoll()  # the wait while gathering: the hub's I/O, no socket
        try:
            due = (int(time.time() / period) + 1) * period
            read_at: float | None = None  # None: read when a socket turns readable
            while True:
                now = time.time()
                if read_at is not None and now >= read_at:
                    found = self._read_ready(hub_event)
                    read_at = self._next_slot(time.time()) if found and self.coalesce else None
                    continue
                if now >= due:
                    tick = round(due / period)
                    on_tick(tick, now - due)
                    # from now, not from the tick: a late turn makes the next one late
                    due = (int(time.time() / period) + 1) * period
                    if tick % timer_ticks == 0:
                        gevent.idle()  # the hub's timers
                    continue
                if read_at is None:
                    ready = self.epoll.poll(due - now, 1)
                    if ready == [hub_event]:
                        gevent.idle()  # the hub's I/O (control, accepts) is not gathered
                    elif ready:
                        read_at = self._next_slot(time.time()) if self.coalesce else 0.0
                else:
                    sleep_serving_hub(hub_only, min(due, read_at))
        finally:
            hub_only.close()
            self.unregister(hub_fd)

    def _next_slot(self, now: float) -> float:
        """The first slot start after ``now``: ``(k + 1/2) * coalesce`` for a whole ``k``."""
        half = self.coalesce / 2
        return (int((now - half) / self.coalesce) + 1) * self.coalesce + half

    def _read_ready(self, hub_event: tuple[int, int]) -> int:
        """Dispatch every socket event ready now (the hub gets a turn if it has I/O);
        return how many there were."""
        found = 0
        full = True
        while full:
            events = self.epoll.poll(0, MAX_EVENTS)
            full = len(events) == MAX_EVENTS
            hub_ready = hub_event in events
            if hub_ready:
                events.remove(hub_event)  # not the dispatcher's
            found += len(events)
            self._dispatch_batch(events)
            if hub_ready or full:  # after a full batch too: the others run
                gevent.idle()  # before the next one
        return found

    def _run(self) -> None:
        hub = get_hub()
        self._watcher = hub.loop.io(self.epoll.fileno(), 1)
        while True:
            hub.wait(self._watcher)
            if self.coalesce:
                time.sleep(self.coalesce)  # blocking: see the class docstring
            while self._batch() == MAX_EVENTS:
                # More is ready now (a full batch). Let the
                # loop turn once first — timers, the control socket, the other
                # greenlets. Not gevent.sleep(0): gevent runs up to 50 queued
                # callbacks before it turns the loop, so a SET behind at 200k
                # connections ran 50 full batches (20 s on a busy box) between
                # turns: silent to the supervisor, killed by the liveness rule.
                gevent.sleep(LOOP_TURN)


def hub_epoll() -> select.epoll:
    """An epoll holding only the gevent hub's own descriptor (``sleep_serving_hub``)."""
    poller = select.epoll()
    poller.register(get_hub().loop.fileno(), select.EPOLLIN)
    return poller


def sleep_serving_hub(poller: select.epoll, deadline: float) -> None:
    """Block until ``deadline`` (wall clock) in one epoll wait, not through the gevent hub.

    ``poller`` is a ``hub_epoll()``: when the hub has I/O (a gevent socket
    turned ready) it gets a turn at once, its greenlets run, and the sleep
    goes on. Its timers do not run here: the caller turns the hub for them.
    Why not ``gevent.sleep``: on the loaded box a wake-up through the hub
    (libev's poll, a timer, two greenlet switches) cost ~100 µs of CPU
    against ~40 for a plain blocking wait (``perf stat`` of 500-wake-up
    loops), and SETs and ticking client workers wake tens of times a second.
    """
    while (wait := deadline - time.time()) > 0:
        if poller.poll(wait, 1):
            gevent.idle()


def plain_reads(events: list[tuple[int, int]], records: dict, plain: Callable[[object, int], bool],
                size: int, rest: list, got: list,
                stamped: bool = False) -> Iterator[tuple[object, bytes, float]]:
    """Read each event of a batch whose record is *plain*; yield ``(record, bytes, arrived)``.

    The shared first step of both hot paths (``app.server.fastpath``,
    ``app.client.fastpath``; ``read_plain`` in ``app/hotslots.h`` is its C
    twin): an event without a record or not ``plain(record, mask)`` goes to
    ``rest`` unread, a peer gone to ``got`` as ``(record, None)``, a read with
    nothing there is dropped. ``arrived`` is the kernel's receive time when
    ``stamped`` and the socket stamps (``read_stamped``), else 0.0.
    """
    for event in events:
        fd, mask = event
        record = records.get(fd)
        if record is None or not plain(record, mask):
            rest.append(event)
            continue
        if stamped:
            data, arrived = read_stamped(fd, size)
        else:
            data, arrived = read_some(fd, size), 0.0
        if data is None:
            got.append((record, None))
        elif data:
            yield record, data, arrived


def write_some(fd: int, data: bytes) -> bytes | None:
    """Write what the socket takes now; return the rest (b'' when all went).

    Returns None when the peer is gone (the caller closes the connection).
    """
    try:
        sent = os.write(fd, data)
    except BlockingIOError:
        return data
    except OSError as exc:
        if exc.errno in GONE:
            return None
        raise
    return data[sent:]


def read_some(fd: int, size: int = 4096) -> bytes | None:
    """Read what is there; b'' if nothing yet, None when the peer closed or failed."""
    try:
        data = os.read(fd, size)
    except BlockingIOError:
        return b""
    except OSError as exc:
        if exc.errno in GONE:
            return None
        raise
    return data if data else None


def read_stamped(fd: int, size: int = 4096) -> tuple[bytes | None, float]:
    """``read_some`` with the kernel's receive time of what was read (0.0: not stamped).

    A socket with ``SO_TIMESTAMPNS`` set reports when its bytes reached it,
    whenever its reader gets to them: a client's latency is then the
    server's, not also its own scheduling delay on a shared box. The Python
    twin of ``read_fd_stamped`` (``app/hotslots.h``); a socket object per
    call, so the reference path only.
    """
    try:
        sock = _socket.socket(fileno=fd)
    except OSError as exc:  # closed under us: as a read would say
        if exc.errno in GONE:
            return None, 0.0
        raise
    try:
        data, ancillary, _, _ = sock.recvmsg(size, STAMP_SPACE)
    except BlockingIOError:
        return b"", 0.0
    except OSError as exc:
        if exc.errno in GONE:
            return None, 0.0
        raise
    finally:
        sock.detach()
    if not data:
        return None, 0.0
    for level, kind, value in ancillary:
        if level == _socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
            seconds, nanoseconds = _TIMESPEC.unpack_from(value)
            return data, seconds + nanoseconds * 1e-9
    return data, 0.0


def close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
