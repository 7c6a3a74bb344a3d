"""A SET's listener: gevent's StreamServer accept loop, handing each descriptor to the reactor.

The product's design names gevent's ``StreamServer`` as the way in, and its
accept loop is the one we want: bounded accepts per wake-up, and on errors
(out of descriptors: EMFILE) it stops accepting for ``min_delay`` doubling
to ``max_delay`` instead of spinning.

Its handler does not get a greenlet here (``spawn=None``: it runs inside the
accept loop) and does not read the LOGIN itself: it gives the bare
descriptor to ``on_accept``, and the SET's reactor reads the LOGIN through
the connection's session, under the deadline the session reports. Why: a
handler greenlet per connection until its LOGIN (the first design) kept
every greenlet of a connect storm in the SET's memory high-water mark —
measured with ``make bench-server`` (5,000 connections at once): 1,306 and
1,549 bytes of SET memory per idle connection, against 265 with the
descriptor going straight to the reactor; the login rate of the scale bench
was the same either way (5,612/s with greenlets, 5,432–5,664/s without).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

from gevent import GreenletExit
from gevent.server import StreamServer

from app.reactor import close_fd

# errnos of a full descriptor table or kernel memory: wait, it passes
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class _Exhausted(GreenletExit):
    """Out of descriptors: the server's backoff applies; a GreenletExit is not printed
    by the hub (one traceback per accept attempt would flood the log at 1M)."""


class Acceptor(StreamServer):
    """Accepts connections; ``on_accept(fd)`` takes each non-blocking descriptor."""

    max_accept = 256  # accepts per wake-up: a connect storm cannot starve frames
    min_delay = 0.01  # seconds accepting pauses after an error (EMFILE), doubling ...
    max_delay = 0.5  # ... up to this

    def __init__(self, listener: socket.socket, on_accept: Callable[[int], None],
                 count: Callable[[str], None]) -> None:
        super().__init__(listener, self.accepted, spawn=None)
        self.on_accept = on_accept
        self.count = count

    def do_read(self) -> tuple[int, tuple] | None:
        """One accept: ``(fd, address)`` with no socket object, or None when none waits."""
        try:
            fd, address = self.socket._accept()
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in EXHAUSTED:
                self.count("accept_exhausted")
                raise _Exhausted() from None
            raise
        return fd, address

    def accepted(self, fd: int, _address: tuple) -> None:
        """The handler, run in the accept loop: the descriptor goes to the SET."""
        try:
            self.on_accept(fd)
        except BaseException:
            close_fd(fd)
            raise

    def do_close(self, *args: object) -> None:
        """The SET owns the descriptor from ``on_accept`` on: nothing to close here."""
