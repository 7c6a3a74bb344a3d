"""One connection's protocol rules, sans-IO: bytes in -> events out, answers packed here.

The codec (``app.protocol.codec``) knows what a frame looks like; a session
knows what a frame *means on this connection*: the LOGIN comes first, once;
a SHAKE or CLAIM naming userid 0 means "the logged-in user" and one naming
anybody else is refused; each side may send only its own commands. The SET,
the client worker and the fuzz harness's oracle all go through a session, so
these rules live here and nowhere else (h11's ``Connection`` is the model:
``receive(bytes) -> events``, methods that return the bytes to send, no
socket anywhere).

A session never does I/O and never reads a clock: the caller passes the
second to stamp answers with, and the LOGIN deadline is a number the session
reports (``login_deadline``) and the IO layer enforces.

Any broken rule raises ``ProtocolError`` (its ``reason`` is a counter key)
and closes the session: the caller closes the connection. Events decoded
before the error in the same ``receive`` are dropped with it.

The state table, in one place (``_SERVER_RULES``, ``_CLIENT_RULES``): for
each phase, what each command does — an event, or the reason it is refused.

Speed: a lone 16-byte SHAKE is nearly all of a SET's traffic and a lone
28-byte SHAKE_RESULT nearly all of a client's, so each side checks for it
first and skips the generic loop (measured with ``make bench-server``: the
SET's CPU per shake is unchanged, see README).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from enum import IntEnum
from typing import NamedTuple

from app.protocol.codec import (
    LAYOUTS,
    RECIPIENTS,
    ClaimResult,
    Command,
    EnvelopePush,
    LoginCode,
    LoginResult,
    ProtocolError,
    ShakeResult,
    check_header,
)

__all__ = [
    "Phase",
    "LoggedIn",
    "ShakeAsked",
    "ShakeRefused",
    "ClaimAsked",
    "ClaimRefused",
    "ServerSession",
    "ClientSession",
]


class Phase(IntEnum):
    LOGIN = 0  # waiting for the LOGIN (server) or its LOGIN_RESULT (client)
    OPEN = 1  # logged in: requests and answers flow
    CLOSED = 2  # a rule was broken; nothing more is accepted


# ----------------------------------------------------------- server events
class LoggedIn(NamedTuple):
    """The client's LOGIN. ``receive`` stops after it: the SET may hand the socket
    off to the user's owner together with ``take_buffered()``."""

    userid: int
    timestamp: int


class ShakeAsked(NamedTuple):
    """A SHAKE for the logged-in user (its userid field was 0 or that user)."""

    timestamp: int


class ShakeRefused(NamedTuple):
    """A SHAKE naming someone other than the logged-in user."""

    userid: int
    timestamp: int


class ClaimAsked(NamedTuple):
    """A CLAIM for the logged-in user."""

    envelope_id: int
    timestamp: int


class ClaimRefused(NamedTuple):
    """A CLAIM naming someone other than the logged-in user."""

    userid: int
    envelope_id: int
    timestamp: int


_new = tuple.__new__  # builds a NamedTuple without its Python-level __new__ (hot path)
_OPEN = Phase.OPEN  # compared with ``is``: an enum attribute lookup costs more than the rest
_CLOSED = Phase.CLOSED
_HEAD = struct.Struct(">HH")
_SHAKE = LAYOUTS[Command.SHAKE]
_SHAKE_SIZE = _SHAKE.size
_SHAKE_CMD = int(Command.SHAKE)
_unpack_shake = _SHAKE.unpack
_LOGIN = LAYOUTS[Command.LOGIN]
_CLAIM = LAYOUTS[Command.CLAIM]
_CLAIM_CMD = int(Command.CLAIM)
_unpack_claim = _CLAIM.unpack
_LOGIN_RESULT = LAYOUTS[Command.LOGIN_RESULT]
_SHAKE_RESULT = LAYOUTS[Command.SHAKE_RESULT]
_SHAKE_RESULT_SIZE = _SHAKE_RESULT.size
_SHAKE_RESULT_CMD = int(Command.SHAKE_RESULT)
_unpack_shake_result = _SHAKE_RESULT.unpack
_PUSH = LAYOUTS[Command.ENVELOPE_PUSH]
_PUSH_CMD = int(Command.ENVELOPE_PUSH)
_unpack_push = _PUSH.unpack
_CLAIM_RESULT = LAYOUTS[Command.CLAIM_RESULT]
_CLAIM_RESULT_CMD = int(Command.CLAIM_RESULT)
_unpack_claim_result = _CLAIM_RESULT.unpack

# The state table. What a received command does in each phase: "event" (it
# becomes an event) or the reason the connection is closed. Before the login
# anything but the login is "login_first"; after it, a command missing from
# the row is one only this side may send ("direction").
_BEFORE_LOGIN = dict.fromkeys(Command, "login_first")
_SERVER_RULES: dict[Phase, dict[int, str]] = {
    Phase.LOGIN: {**_BEFORE_LOGIN, Command.LOGIN: "event"},
    Phase.OPEN: {Command.LOGIN: "login_twice", Command.SHAKE: "event", Command.CLAIM: "event"},
}
_CLIENT_RULES: dict[Phase, dict[int, str]] = {
    Phase.LOGIN: {**_BEFORE_LOGIN, Command.LOGIN_RESULT: "event"},
    Phase.OPEN: {Command.LOGIN_RESULT: "login_twice", Command.SHAKE_RESULT: "event",
                 Command.ENVELOPE_PUSH: "event", Command.CLAIM_RESULT: "event"},
}


def _frames(buf: bytes, table: dict[Phase, dict[int, str]], session: _Session):
    """Yield ``(offset, command, values)`` of each complete frame the table allows
    in the session's phase (looked up per frame: a LOGIN_RESULT changes it).

    Validates every header before its body is needed; stops at an incomplete
    frame (the caller keeps ``buf[offset:]``).
    """
    offset, end = 0, len(buf)
    while end - offset >= 4:
        length, cmd = _HEAD.unpack_from(buf, offset)
        check_header(length, cmd)
        verdict = table[session.phase].get(cmd, "direction")
        if verdict != "event":
            raise ProtocolError(verdict, f"command {cmd}")
        if end - offset < length:
            return
        yield offset + length, cmd, LAYOUTS[cmd].unpack_from(buf, offset)
        offset += length


class _Session:
    __slots__ = ("userid", "phase", "_buf")

    def __init__(self, userid: int = 0) -> None:
        self.userid = userid
        self.phase = Phase.LOGIN
        self._buf = b""

    @property
    def logged_in(self) -> bool:
        return self.phase == Phase.OPEN

    @property
    def buffered(self) -> int:
        """Bytes held back: part of a frame, or (server) what followed the LOGIN."""
        return len(self._buf)

    def take_buffered(self) -> bytes:
        """Hand over the bytes not yet turned into events (they leave the session)."""
        buf, self._buf = self._buf, b""
        return buf

    def _fail(self, exc: ProtocolError) -> ProtocolError:
        self.phase = Phase.CLOSED
        self._buf = b""
        return exc

    def _closed(self) -> ProtocolError:
        return ProtocolError("closed", "the session already broke the protocol")


class ServerSession(_Session):
    """The SET's side of one connection: client requests in, answers out.

    ``login_deadline`` (seconds, the caller's clock) is when a connection
    that has not sent its LOGIN must be closed; the session does not close
    anything itself.
    """

    __slots__ = ("login_deadline",)

    def __init__(self, login_deadline: float = 0.0) -> None:
        super().__init__()
        self.login_deadline = login_deadline

    def resume(self, userid: int) -> None:
        """Continue a connection whose LOGIN another SET read (a hand-off)."""
        self.userid = userid
        self.phase = Phase.OPEN

    def receive(self, data: bytes) -> Sequence[tuple]:
        """Events of the frames now complete; raises ProtocolError on a broken rule.

        Before the LOGIN, decoding stops right after it (see ``LoggedIn``):
        call ``receive(b"")`` to go on with the bytes that followed it.
        """
        buf = self._buf + data if self._buf else data
        # One whole SHAKE or CLAIM, the usual read once logged in: decoded
        # directly (the same events as the loop below; anything else goes there).
        size = len(buf)
        if size == _SHAKE_SIZE and self.phase is _OPEN:
            length, cmd, sent, userid = _unpack_shake(buf)
            if length == _SHAKE_SIZE and cmd == _SHAKE_CMD:
                self._buf = b""
                if userid == 0 or userid == self.userid:
                    return (_new(ShakeAsked, (sent,)),)
                return (_new(ShakeRefused, (userid, sent)),)
        elif size == _CLAIM.size and self.phase is _OPEN:
            length, cmd, sent, userid, eid = _unpack_claim(buf)
            if length == size and cmd == _CLAIM_CMD:
                self._buf = b""
                if userid == 0 or userid == self.userid:
                    return (_new(ClaimAsked, (eid, sent)),)
                return (_new(ClaimRefused, (userid, eid, sent)),)
        if self.phase is _CLOSED:
            raise self._closed()
        events: list[tuple] = []
        offset = 0
        try:
            for consumed, cmd, values in _frames(buf, _SERVER_RULES, self):
                offset = consumed
                sent, userid = values[2], values[3]
                if cmd == Command.SHAKE:
                    if userid == 0 or userid == self.userid:
                        events.append(_new(ShakeAsked, (sent,)))
                    else:
                        events.append(_new(ShakeRefused, (userid, sent)))
                elif cmd == Command.CLAIM:
                    if userid == 0 or userid == self.userid:
                        events.append(_new(ClaimAsked, (values[4], sent)))
                    else:
                        events.append(_new(ClaimRefused, (userid, values[4], sent)))
                else:  # the LOGIN: stop here, the caller may hand the rest off
                    self.userid = userid
                    self.phase = Phase.OPEN
                    events.append(_new(LoggedIn, (userid, sent)))
                    break
        except ProtocolError as exc:
            raise self._fail(exc) from None
        self._buf = buf[offset:]
        return events

    # --- answers: the only commands a server may send ---------------------
    def login_result(self, code: int, second: int) -> bytes:
        return _LOGIN_RESULT.pack(_LOGIN_RESULT.size, Command.LOGIN_RESULT, second,
                                  self.userid, code)

    def shake_result(self, code: int, envelope_id: int, amount: int, second: int) -> bytes:
        return _SHAKE_RESULT.pack(_SHAKE_RESULT_SIZE, Command.SHAKE_RESULT, second, self.userid,
                                  code, envelope_id, amount)

    def push(self, envelope_id: int, share: int, recipients: tuple[int, int, int],
             second: int) -> bytes:
        """ENVELOPE_PUSH of a group envelope: ``share`` is this recipient's part."""
        return _PUSH.pack(_PUSH.size, Command.ENVELOPE_PUSH, second, envelope_id, share,
                          RECIPIENTS, *recipients)

    def claim_result(self, envelope_id: int, amount: int, second: int) -> bytes:
        return _CLAIM_RESULT.pack(_CLAIM_RESULT.size, Command.CLAIM_RESULT, second,
                                  envelope_id, amount)


class ClientSession(_Session):
    """A client's side of one connection: requests out, the server's frames in.

    Events are the codec's server frames (``LoginResult``, ``ShakeResult``,
    ``EnvelopePush``, ``ClaimResult``); a LOGIN_RESULT other than OK raises
    ProtocolError("login").
    """

    __slots__ = ()

    def login(self, second: int) -> bytes:
        return _LOGIN.pack(_LOGIN.size, Command.LOGIN, second, self.userid)

    def shake(self, second: int) -> bytes:
        return _SHAKE.pack(_SHAKE_SIZE, Command.SHAKE, second, self.userid)

    def claim(self, envelope_id: int, second: int) -> bytes:
        """CLAIM naming userid 0 ("me"), as the classic client sends it."""
        return _CLAIM.pack(_CLAIM.size, Command.CLAIM, second, 0, envelope_id)

    def receive(self, data: bytes) -> Sequence[tuple]:
        buf = self._buf + data if self._buf else data
        # One whole SHAKE_RESULT, ENVELOPE_PUSH or CLAIM_RESULT once logged in:
        # decoded directly (the same events as the loop below, which gets the rest).
        size = len(buf)
        if self.phase is _OPEN:
            if size == _SHAKE_RESULT_SIZE:
                length, cmd, sent, userid, result, eid, amount = _unpack_shake_result(buf)
                if length == size and cmd == _SHAKE_RESULT_CMD:
                    self._buf = b""
                    return (_new(ShakeResult, (userid, result, eid, amount, sent)),)
            elif size == _PUSH.size:
                length, cmd, sent, eid, share, count, r1, r2, r3 = _unpack_push(buf)
                if length == size and cmd == _PUSH_CMD and count == RECIPIENTS:
                    self._buf = b""
                    return (_new(EnvelopePush, (eid, share, (r1, r2, r3), sent)),)
            elif size == _CLAIM_RESULT.size:
                length, cmd, sent, eid, amount = _unpack_claim_result(buf)
                if length == size and cmd == _CLAIM_RESULT_CMD:
                    self._buf = b""
                    return (_new(ClaimResult, (eid, amount, sent)),)
        if self.phase is _CLOSED:
            raise self._closed()
        events: list[tuple] = []
        offset = 0
        try:
            for consumed, cmd, values in _frames(buf, _CLIENT_RULES, self):
                offset = consumed
                if cmd == Command.ENVELOPE_PUSH:
                    eid, share, count, r1, r2, r3 = values[3:]
                    if count != RECIPIENTS:
                        raise ProtocolError("body", f"recipient count {count} != {RECIPIENTS}")
                    events.append(_new(EnvelopePush, (eid, share, (r1, r2, r3), values[2])))
                    continue
                if cmd == Command.LOGIN_RESULT:
                    if values[4] != LoginCode.OK:
                        raise ProtocolError("login", f"refused with {values[4]}")
                    self.phase = Phase.OPEN
                events.append(_new(_CLIENT_EVENTS[cmd], (*values[3:], values[2])))
        except ProtocolError as exc:
            raise self._fail(exc) from None
        self._buf = buf[offset:]
        return events


_CLIENT_EVENTS = {Command.LOGIN_RESULT: LoginResult, Command.SHAKE_RESULT: ShakeResult,
                  Command.CLAIM_RESULT: ClaimResult}
