"""A SET's connections on its reactor: who is connected, and answers waiting to go out.

Writes are buffered: ``send`` queues bytes on a connection, and nothing
reaches a socket before ``release()`` — which only the SET's commit step
calls, after the journal write holding those answers' records succeeded
(``app.server.set_worker.SetWorker.commit``). A socket that does not take
everything at once waits for EPOLLOUT; a peer that lets more than
``MAX_OUTBUF`` pile up is cut off.
"""

from __future__ import annotations

from collections.abc import Callable

from app import protocol as p
from app.reactor import READ, READ_WRITE, Reactor, close_fd, write_some
from app.server import fastpath

MAX_OUTBUF = 64 * 1024  # a peer that does not read its answers is cut off past this


class Conn(p.ServerSession):
    """One socket: its protocol session plus the descriptor and unsent answers.

    The record extends the session rather than holding one, so a connection
    costs one object (memory per idle connection is a headline figure).
    """

    __slots__ = ("fd", "out", "blocked")

    def __init__(self, fd: int, login_deadline: float = 0.0) -> None:
        super().__init__(login_deadline)
        self.fd = fd
        self.out = b""
        self.blocked = False  # waiting for EPOLLOUT with ``out`` pending


# The bulk SHAKE path over these records: compiled when built (app.server.fastpath)
HOT = fastpath.implementation(Conn)


class Transport:
    """Every socket of one SET (``conns``) and its logged-in users (``users``)."""

    def __init__(self, reactor: Reactor, count: Callable[[str], None]) -> None:
        self.reactor = reactor
        self.count = count
        self.conns: dict[int, Conn] = {}
        self.users: dict[int, Conn] = {}
        self.dirty: list[Conn] = []

    def add(self, conn: Conn) -> None:
        self.conns[conn.fd] = conn
        self.reactor.register(conn.fd, READ)

    def detach(self, conn: Conn) -> None:
        """Forget a socket without closing it (it is being handed to another SET)."""
        self.conns.pop(conn.fd, None)
        self.reactor.unregister(conn.fd)

    def is_open(self, conn: Conn) -> bool:
        return self.conns.get(conn.fd) is conn

    def log_in(self, conn: Conn) -> None:
        """``conn`` is now its user's connection; an older one is closed ("replaced")."""
        old = self.users.get(conn.userid)
        if old is not None and old is not conn:
            self.close(old, "replaced")
        self.users[conn.userid] = conn

    def send(self, conn: Conn, data: bytes) -> None:
        """Queue an answer; it goes out at the next ``release()``."""
        if not conn.out:
            conn.out = data
            if not conn.blocked:
                self.dirty.append(conn)
        elif len(conn.out) > MAX_OUTBUF:
            self.close(conn, "slow_reader")
        else:
            conn.out += data

    def release(self) -> None:
        """Write every queued answer (the caller has made their records safe)."""
        dirty, self.dirty = self.dirty, []
        for conn, rest in HOT.write_out(dirty, self.conns):
            if rest is None:
                self.close(conn, "peer_closed")
            else:
                conn.out = rest
                conn.blocked = True
                self.reactor.modify(conn.fd, READ_WRITE)

    def discard(self) -> None:
        """Drop every queued answer unsent (their records could not be made safe)."""
        for conn in self.dirty:
            conn.out = b""
        self.dirty = []

    def writable(self, conn: Conn) -> None:
        """EPOLLOUT on a blocked connection: write what it now takes."""
        rest = write_some(conn.fd, conn.out)
        if rest is None:
            self.close(conn, "peer_closed")
            return
        conn.out = rest
        if not rest:
            conn.blocked = False
            self.reactor.modify(conn.fd, READ)

    def close(self, conn: Conn, reason: str) -> None:
        if self.conns.pop(conn.fd, None) is not conn:
            return
        self.reactor.unregister(conn.fd)
        close_fd(conn.fd)
        if conn.logged_in and self.users.get(conn.userid) is conn:
            del self.users[conn.userid]
        self.count("close." + reason)

    def close_all(self) -> None:
        for conn in self.conns.values():
            close_fd(conn.fd)
        self.conns.clear()
        self.users.clear()
        self.dirty = []
