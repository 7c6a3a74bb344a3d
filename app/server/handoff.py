"""Passing a logged-in socket to the SET that owns its user (SCM_RIGHTS over Unix datagrams).

Each SET has one inbox (a Unix datagram socket the supervisor created, so
it outlives the SET's restarts) and an outbox to every SET's inbox. A
hand-off is one datagram: the userid, the bytes read after the LOGIN, and
the descriptor. An inbox holds only ``net.unix.max_dgram_qlen`` datagrams
(10 by default): under a connect storm it fills within a batch, so a full
inbox means "queue and wait for EPOLLOUT on it", not "drop the user".
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Callable

from app import protocol as p
from app.reactor import WRITE, Reactor, close_fd

log = logging.getLogger("hongbao.set")

READ_SIZE = 4096  # a SET reads sockets this much at a time
MAX_RECEIVE = 256  # hand-offs taken per batch: a storm cannot starve frames
MAX_HANDOFF_QUEUE = 20_000  # sockets waiting per owner before we give up on them
HANDOFF = struct.Struct(">I")  # userid; then the bytes received after the LOGIN frame
# A hand-off carries at most one read after the LOGIN (a partial LOGIN held back
# plus READ_SIZE): the inbox must take datagrams that big, or the tail is cut off.
HANDOFF_MAX = HANDOFF.size + READ_SIZE + p.FRAME_SIZES[p.Command.LOGIN]


class HandoffRouter:
    """This SET's inbox and its outboxes to the other SETs, with their waiting queues."""

    def __init__(self, reactor: Reactor, inbox_fd: int, outbox_fds: list[int],
                 count: Callable[[str], None]) -> None:
        self.reactor = reactor
        self.count = count
        self.inbox_fd = inbox_fd
        self.outbox_fds = outbox_fds
        self.inbox = socket.socket(fileno=inbox_fd)
        self.inbox.setblocking(False)
        self.outboxes = [socket.socket(fileno=fd) for fd in outbox_fds]
        for box in self.outboxes:
            box.setblocking(False)
        self.queues: list[deque[tuple[int, bytes]]] = [deque() for _ in self.outboxes]
        self.waiting: dict[int, int] = {}  # outbox fd -> owner, while its queue is not empty
        reactor.register(inbox_fd)

    def send(self, owner: int, fd: int, userid: int, rest: bytes) -> None:
        """Pass ``fd`` (already out of our reactor) to ``owner``; we close our copy."""
        payload = HANDOFF.pack(userid) + rest
        if not self.queues[owner]:
            try:
                socket.send_fds(self.outboxes[owner], [payload], [fd])
            except BlockingIOError:
                pass  # the inbox is full: queue it below
            except OSError as exc:  # owner gone for good: the client reconnects
                self.count("handoff.failed")
                log.debug("hand-off to SET %d failed: %s", owner, exc)
                close_fd(fd)
                return
            else:
                self.count("handoff.sent")
                close_fd(fd)
                return
        self._queue(owner, fd, payload)

    def _queue(self, owner: int, fd: int, payload: bytes) -> None:
        queue = self.queues[owner]
        if len(queue) >= MAX_HANDOFF_QUEUE:
            self.count("handoff.failed")
            close_fd(fd)
            return
        if not queue:
            self.reactor.register(self.outbox_fds[owner], WRITE)
            self.waiting[self.outbox_fds[owner]] = owner
        queue.append((fd, payload))
        self.count("handoff.queued")

    def drain(self, outbox_fd: int) -> None:
        """An owner's inbox has room again: send what waited, in order."""
        owner = self.waiting[outbox_fd]
        queue = self.queues[owner]
        while queue:
            fd, payload = queue.popleft()
            try:
                socket.send_fds(self.outboxes[owner], [payload], [fd])
                self.count("handoff.sent")
            except BlockingIOError:
                queue.appendleft((fd, payload))
                return
            except OSError:
                self.count("handoff.failed")
            close_fd(fd)
        self.reactor.unregister(outbox_fd)
        del self.waiting[outbox_fd]

    def receive(self) -> list[tuple[int, int, bytes]]:
        """Sockets handed to us: ``(fd, userid, bytes after the LOGIN)``, non-blocking."""
        got = []
        for _ in range(MAX_RECEIVE):
            try:
                msg, fds, flags, _addr = socket.recv_fds(self.inbox, HANDOFF_MAX, 4)
            except BlockingIOError:
                break
            if len(fds) != 1 or len(msg) < HANDOFF.size or flags & socket.MSG_TRUNC:
                for fd in fds:
                    close_fd(fd)
                self.count("handoff.bad")
                continue
            os.set_blocking(fds[0], False)
            (userid,) = HANDOFF.unpack_from(msg)
            self.count("handoff.received")
            got.append((fds[0], userid, msg[HANDOFF.size:]))
        return got
