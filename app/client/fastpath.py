"""A client worker's commonest traffic in bulk: lone SHAKEs out, lone SHAKE_RESULTs in.

Two steps, each over many connections per call, the rest going the general
way (the session, ``Worker.send``, ``Worker._frames``):

- ``send_shakes(conns, second, now, cap, outstanding, send)`` asks each
  user of ``conns`` (one tick's slice) for a SHAKE under the closed loop: a
  user not connected is skipped, a user whose previous SHAKE is unanswered
  (or a process already ``cap`` answers behind) is busy; returns
  ``(sent, skipped, busy, outstanding)``. A socket that does not take the
  frame at once goes through ``send(conn, rest, now)``. A request's
  ``sent_at`` is the wall clock just before its write, not the tick's
  ``now``: a worker preempted in the middle of a tick (niced, on the
  server's box) would otherwise add its own wait to the server's latency.
- ``read_answers(events, by_fd, size, now, hist, results, by_second, served)``
  reads every plain connection that is ready; answers made only of
  SHAKE_RESULTs are counted at once (``results`` by code, ``by_second`` by
  the second they arrived, ``served`` the same for the answers that served
  the request, GOT and NONE_LEFT; latency into ``hist``, the user free to be asked
  again); returns ``(rest, got, answered, amount, released)``: events not
  read, (conn, bytes) read but not only SHAKE_RESULTs or (conn, None) for a
  peer gone, answers, the amount they granted, and how many unanswered
  SHAKEs they released. "Arrived" is the kernel's receive time of the read
  (the worker's sockets set ``SO_TIMESTAMPNS``), ``now`` for a socket that
  does not stamp: on a box the clients share with the server, a worker
  waiting for a CPU would otherwise add its own delay to the server's
  latency and move answers into the next second.

This module is the reference: ``implementation()`` returns the compiled
``app.client._fastclient`` when built (same functions, same results; tests
compare the two) and this module otherwise. "Plain": a record of exactly
the bound class, logged in, nothing queued to write, its session of the
bound class with no partial frame, and an event that is only EPOLLIN.
"""

from __future__ import annotations

import os
import select
import struct
import sys
from time import time
from types import ModuleType

from app import hotpath
from app.protocol import ClientSession, Phase, ShakeCode
from app.reactor import plain_reads

_SHAKE = struct.Struct(">HHQI")
_RESULT = struct.Struct(">HHQIIII")
RESULT_SIZE = _RESULT.size
_RESULT_CMD = 3
_GOT = int(ShakeCode.GOT)
SERVED = frozenset({_GOT, int(ShakeCode.NONE_LEFT)})  # answers that served the request
_bound: dict = {}


def bind(conn_type: type, session_type: type, open_phase: object, ready: int) -> None:
    """Name the record classes, the session's open phase and the READY state."""
    _bound.update(conn=conn_type, session=session_type, open=open_phase, ready=ready)


def send_shakes(conns: list, second: int, now: float, cap: int, outstanding: int, send):
    """Ask each of ``conns`` once (see the module docstring)."""
    ready, write = _bound["ready"], os.write
    sent = skipped = busy = 0
    for conn in conns:
        if conn.state != ready:
            skipped += 1
            continue
        if conn.sent_at or outstanding >= cap:
            busy += 1
            continue
        frame = _SHAKE.pack(16, 2, second, conn.userid)
        at = time()  # this request's send time, not the tick's (the module docstring)
        try:  # the common case: nothing queued, the socket takes it all
            done = -1 if conn.out else write(conn.fd, frame)
        except OSError:
            done = -1  # send() sorts out EAGAIN from a peer that is gone
        if done != len(frame):
            send(conn, frame[max(done, 0):], now)
        if conn.state == ready:
            conn.sent_at = at
            outstanding += 1
            conn.asks += 1
            conn.asked = second
            sent += 1
        else:
            skipped += 1  # the write found the connection gone
    return sent, skipped, busy, outstanding


def _plain(conn: object, mask: int) -> bool:
    session = conn.session
    return (type(conn) is _bound["conn"] and mask == select.EPOLLIN
            and conn.state == _bound["ready"] and not conn.out
            and type(session) is _bound["session"] and session.phase is _bound["open"]
            and not session._buf)


def read_answers(events: list[tuple[int, int]], by_fd: dict, size: int, now: float, hist,
                 results: dict, by_second: dict, served: dict):
    """Read and count lone SHAKE_RESULTs (see the module docstring)."""
    rest: list[tuple[int, int]] = []
    got: list[tuple[object, bytes | None]] = []
    answered = amount = released = 0
    for conn, data, arrived in plain_reads(events, by_fd, _plain, size, rest, got, stamped=True):
        frames = _results(data)
        if frames is None:
            got.append((conn, data))
            continue
        if arrived <= 0.0:
            arrived = now  # a socket that does not stamp: when we read it
        second = int(arrived)
        by_second[second] = by_second.get(second, 0) + len(frames)
        useful = 0
        for result, granted in frames:
            answered += 1
            if result in SERVED:
                useful += 1
            results[result] = results.get(result, 0) + 1
            if result == _GOT:
                amount += granted
            if conn.sent_at:
                hist.record(int((arrived - conn.sent_at) * 1e6))
                conn.sent_at = 0.0
                released += 1
        if useful:
            served[second] = served.get(second, 0) + useful
    return rest, got, answered, amount, released


def _results(data: bytes) -> list[tuple[int, int]] | None:
    """(result, amount) of each frame if ``data`` is only whole SHAKE_RESULTs, else None."""
    if len(data) % RESULT_SIZE:
        return None
    out = []
    for length, cmd, _, _, result, _, amount in _RESULT.iter_unpack(data):
        if length != RESULT_SIZE or cmd != _RESULT_CMD:
            return None
        out.append((result, amount))
    return out


def implementation(conn_type: type, ready: int) -> ModuleType:
    """The compiled module bound to ``conn_type`` when available, else this one."""
    fast = hotpath.compiled("app.client._fastclient")
    module = fast if fast is not None else sys.modules[__name__]
    module.bind(conn_type, ClientSession, Phase.OPEN, ready)
    return module
