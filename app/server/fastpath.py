"""The SET's commonest traffic in bulk: lone SHAKEs read, their answers queued and written.

Nearly every request a SET serves is one 16-byte SHAKE on a logged-in
connection with nothing else pending, and nearly every answer one 28-byte
SHAKE_RESULT. A reactor batch handles those in three steps over all its
connections at once, the rest going the general way (the session,
``Service.serve``):

- ``read_shakes(events, conns, size)`` reads every plain connection that
  is ready and splits the batch: ``rest`` (events not read: not plain),
  ``got`` ((conn, bytes) read but not only SHAKEs, or (conn, None): peer
  gone), and the SHAKEs themselves as ``shakers`` (one entry per SHAKE)
  with their stamped ``sents``;
- ``queue_results(shakers, granted, allowed, second, dirty, send)`` queues
  each SHAKE's answer: the first ``len(granted)`` got those envelopes, the
  rest up to ``allowed`` found none left, the others are over budget;
- ``write_out(dirty, conns)`` writes queued answers after the journal
  write; it returns ``(conn, rest)`` for each socket that did not take
  everything (``rest`` None: the peer is gone).

This module is the reference: ``implementation()`` returns the compiled
``app.server._fastset`` when built (same functions, same results; tests
compare the two) and this module otherwise. "Plain" means: a connection
record of exactly the bound class, logged in, no partial frame held, no
answer queued or blocked, and an event that is only EPOLLIN.
"""

from __future__ import annotations

import select
import struct
import sys
from types import ModuleType

from app import hotpath
from app.protocol import Phase, ShakeCode
from app.reactor import plain_reads, write_some

_SHAKE = struct.Struct(">HHQI")
SHAKE_SIZE = _SHAKE.size
_SHAKE_CMD = 2
GOT, NONE_LEFT, OVERLOAD = int(ShakeCode.GOT), int(ShakeCode.NONE_LEFT), int(ShakeCode.OVERLOAD)
_OPEN = Phase.OPEN
_conn_type: type | None = None


def bind(conn_type: type, open_phase: object) -> None:
    """Name the connection record class whose instances may take the fast path."""
    global _conn_type, _OPEN
    _conn_type, _OPEN = conn_type, open_phase


def _plain(conn: object, mask: int) -> bool:
    return (type(conn) is _conn_type and mask == select.EPOLLIN and conn.phase is _OPEN
            and not conn._buf and not conn.blocked and not conn.out)


def read_shakes(events: list[tuple[int, int]], conns: dict, size: int):
    """Split a batch: ``(rest, got, shakers, sents)`` (see the module docstring)."""
    rest: list[tuple[int, int]] = []
    got: list[tuple[object, bytes | None]] = []
    shakers: list[object] = []
    sents: list[int] = []
    for conn, data, _ in plain_reads(events, conns, _plain, size, rest, got):
        frames = _shakes(data, conn.userid)
        if frames is None:
            got.append((conn, data))
            continue
        for sent in frames:
            shakers.append(conn)
            sents.append(sent)
    return rest, got, shakers, sents


def _shakes(data: bytes, userid: int) -> list[int] | None:
    """The stamped seconds if ``data`` is only whole SHAKEs of this user (or of 0), else None."""
    if len(data) % SHAKE_SIZE:
        return None
    sents = []
    for length, cmd, sent, who in _SHAKE.iter_unpack(data):
        if length != SHAKE_SIZE or cmd != _SHAKE_CMD or (who and who != userid):
            return None
        sents.append(sent)
    return sents


def queue_results(shakers: list, granted: list[tuple[int, int]], allowed: int, second: int,
                  dirty: list, send) -> None:
    """Queue every SHAKE's answer through ``send(conn, bytes)`` (``Transport.send``)."""
    g = len(granted)
    for i, conn in enumerate(shakers):
        if i < g:
            eid, amount = granted[i]
            frame = conn.shake_result(GOT, eid, amount, second)
        else:
            frame = conn.shake_result(NONE_LEFT if i < allowed else OVERLOAD, 0, 0, second)
        send(conn, frame)


def write_out(dirty: list, conns: dict) -> list[tuple[object, bytes | None]]:
    """Write each open, unblocked connection's queued answers; what did not all go."""
    left = []
    for conn in dirty:
        if conn.blocked or conns.get(conn.fd) is not conn:
            continue
        rest = write_some(conn.fd, conn.out)
        if rest:
            left.append((conn, rest))
        elif rest is None:
            left.append((conn, None))
        else:
            conn.out = b""
    return left


def implementation(conn_type: type) -> ModuleType:
    """The compiled module bound to ``conn_type`` when available, else this one."""
    fast = hotpath.compiled("app.server._fastset")
    module = fast if fast is not None else sys.modules[__name__]
    module.bind(conn_type, Phase.OPEN)
    return module
