"""A SET's listener: gevent's StreamServer, with a greenlet per connection only until its LOGIN.

The product's design names gevent's ``StreamServer`` as the way in, and its
accept loop is the one we want: bounded accepts per wake-up, and on errors
(out of descriptors: EMFILE) it stops accepting for ``min_delay`` doubling
to ``max_delay`` instead of spinning. Its handler greenlet reads the LOGIN
through a ``ServerSession`` under the deadline the session reports, then
gives the descriptor away (``socket.detach()``, so the server does not
close it) to ``on_login``: the SET's reactor for its own users, the owner's
inbox for others. A logged-in connection therefore still costs no greenlet;
only a connection that has not finished its LOGIN has one.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable

import gevent
from gevent import GreenletExit
from gevent.pool import Pool
from gevent.server import StreamServer

from app import protocol as p
from app.server.handoff import READ_SIZE
from app.server.transport import Conn

# errnos of a full descriptor table or kernel memory: wait, it passes
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class _Exhausted(GreenletExit):
    """Out of descriptors: the server's backoff applies; a GreenletExit is not printed
    by the hub (one traceback per accept attempt would flood the log at 1M)."""


class LoginServer(StreamServer):
    """Accepts connections and reads their LOGIN; ``on_login(conn)`` takes each logged-in one."""

    max_accept = 256  # accepts per wake-up: a connect storm cannot starve frames
    min_delay = 0.01  # seconds accepting pauses after an error (EMFILE), doubling ...
    max_delay = 0.5  # ... up to this
    max_pending = 10_000  # connections between accept and LOGIN; past this the kernel's
    # backlog holds the rest, so hostile idle connections cannot buy unbounded greenlets

    def __init__(self, listener: socket.socket, login_timeout: float,
                 on_login: Callable[[Conn], None], on_protocol_error: Callable[[str], None],
                 count: Callable[[str], None]) -> None:
        super().__init__(listener, self.read_login, spawn=Pool(self.max_pending))
        self.login_timeout = login_timeout
        self.on_login = on_login
        self.on_protocol_error = on_protocol_error
        self.count = count

    def do_read(self) -> tuple | None:
        try:
            return super().do_read()
        except OSError as exc:
            if exc.errno in EXHAUSTED:
                self.count("accept_exhausted")
                raise _Exhausted() from None
            raise

    def read_login(self, sock: socket.socket, _address: tuple) -> None:
        """The handler greenlet: until the LOGIN, a deadline, or a broken rule."""
        self.count("accepted")
        conn = Conn(-1, time.time() + self.login_timeout)
        with gevent.Timeout(max(0.0, conn.login_deadline - time.time()), False):
            try:
                while not conn.logged_in:
                    data = sock.recv(READ_SIZE)
                    if not data:
                        self.count("close.peer_closed")
                        return
                    conn.receive(data)
            except p.ProtocolError as exc:
                self.on_protocol_error(exc.reason)
                self.count("close.protocol_error")
                return
            except OSError:
                self.count("close.peer_closed")
                return
        if not conn.logged_in:
            self.count("close.login_timeout")
            return  # the server closes the socket
        conn.fd = sock.detach()
        os.set_blocking(conn.fd, False)
        self.on_login(conn)
