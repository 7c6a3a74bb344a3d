"""The hongbao wire protocol, sans-IO: bytes in, frames out, frames in, bytes out.

No sockets here, so the codec is tested on its own and shared by the server
and the client agent. Layout (big-endian, compatible with the classic Go
prototype): a 12-byte header ``length u16, command u16, timestamp u64``
(length counts the whole frame, timestamp is the sender's clock in unix
seconds), then a body of u32 fields whose size is fixed per command.

Every layout is one precompiled ``struct.Struct`` in ``LAYOUTS``; the frame
class for a command is found through ``FRAME_TYPES`` (h2/hyperframe style).
A frame is rejected as soon as its header is complete: wrong length for its
command, unknown command, or larger than ``MAX_FRAME`` — so a hostile peer
can never make us buffer more than one small frame.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import NamedTuple

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "Command",
    "ShakeCode",
    "LoginCode",
    "LAYOUTS",
    "FRAME_SIZES",
    "MAX_FRAME",
    "RECIPIENTS",
    "U32_MAX",
    "ProtocolError",
    "Login",
    "LoginResult",
    "Shake",
    "ShakeResult",
    "EnvelopePush",
    "Claim",
    "ClaimResult",
    "Frame",
    "FRAME_TYPES",
    "CLIENT_COMMANDS",
    "SERVER_COMMANDS",
    "encode",
    "check_header",
    "decode_frames",
    "Decoder",
]

HEADER = struct.Struct(">HHQ")
HEADER_SIZE = HEADER.size  # 12


class Command(IntEnum):
    LOGIN = 0
    LOGIN_RESULT = 1
    SHAKE = 2
    SHAKE_RESULT = 3
    ENVELOPE_PUSH = 4
    CLAIM = 5
    CLAIM_RESULT = 6


class ShakeCode(IntEnum):
    """The ``result`` field of SHAKE_RESULT."""

    GOT = 14  # an envelope was granted (envelope id and amount follow)
    NONE_LEFT = 15  # the bucket is empty this moment
    REFUSED = 16  # the userid field names someone other than the logged-in user
    OVERLOAD = 17  # the SET is past its per-second budget


class LoginCode(IntEnum):
    """The ``result`` field of LOGIN_RESULT."""

    OK = 0
    WRONG_SET = 2  # handed to a SET that does not own the user (internal fault)


# One layout per command: header + body, packed in one call on the hot path.
LAYOUTS: dict[int, struct.Struct] = {
    Command.LOGIN: struct.Struct(">HHQI"),
    Command.LOGIN_RESULT: struct.Struct(">HHQII"),
    Command.SHAKE: struct.Struct(">HHQI"),
    Command.SHAKE_RESULT: struct.Struct(">HHQIIII"),
    Command.ENVELOPE_PUSH: struct.Struct(">HHQIIIIII"),
    Command.CLAIM: struct.Struct(">HHQII"),
    Command.CLAIM_RESULT: struct.Struct(">HHQII"),
}
FRAME_SIZES: dict[int, int] = {cmd: layout.size for cmd, layout in LAYOUTS.items()}
MAX_FRAME = max(FRAME_SIZES.values())  # 36: nothing longer is ever valid
RECIPIENTS = 3  # an ENVELOPE_PUSH always names exactly three recipients

U32_MAX = 0xFFFFFFFF


class ProtocolError(Exception):
    """The peer broke the protocol; the connection must be closed.

    ``reason`` is a short stable word used as a metric/counter key.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Login(NamedTuple):
    userid: int
    timestamp: int = 0
    command = Command.LOGIN


class LoginResult(NamedTuple):
    userid: int
    result: int
    timestamp: int = 0
    command = Command.LOGIN_RESULT


class Shake(NamedTuple):
    userid: int  # 0 means "the logged-in user"
    timestamp: int = 0
    command = Command.SHAKE


class ShakeResult(NamedTuple):
    userid: int
    result: int
    envelope_id: int = 0
    amount: int = 0
    timestamp: int = 0
    command = Command.SHAKE_RESULT


class EnvelopePush(NamedTuple):
    envelope_id: int
    amount: int  # this recipient's share
    recipients: tuple[int, int, int]
    timestamp: int = 0
    command = Command.ENVELOPE_PUSH


class Claim(NamedTuple):
    userid: int  # 0 means "the logged-in user" (the classic client sends 0)
    envelope_id: int
    timestamp: int = 0
    command = Command.CLAIM


class ClaimResult(NamedTuple):
    envelope_id: int
    amount: int  # 0 = nothing granted
    timestamp: int = 0
    command = Command.CLAIM_RESULT


Frame = Login | LoginResult | Shake | ShakeResult | EnvelopePush | Claim | ClaimResult

FRAME_TYPES: dict[int, type] = {
    Command.LOGIN: Login,
    Command.LOGIN_RESULT: LoginResult,
    Command.SHAKE: Shake,
    Command.SHAKE_RESULT: ShakeResult,
    Command.ENVELOPE_PUSH: EnvelopePush,
    Command.CLAIM: Claim,
    Command.CLAIM_RESULT: ClaimResult,
}

# Which side may send which command (the server refuses server->client frames).
CLIENT_COMMANDS = frozenset({Command.LOGIN, Command.SHAKE, Command.CLAIM})
SERVER_COMMANDS = frozenset(FRAME_TYPES) - CLIENT_COMMANDS


def encode(frame: Frame) -> bytes:
    """Serialise one frame (its ``timestamp`` goes in the header)."""
    cmd = frame.command
    layout = LAYOUTS[cmd]
    if cmd == Command.ENVELOPE_PUSH:
        if len(frame.recipients) != RECIPIENTS:
            raise ValueError("ENVELOPE_PUSH names exactly three recipients")
        body = (frame.envelope_id, frame.amount, RECIPIENTS, *frame.recipients)
    else:
        body = frame[:-1]
    try:
        return layout.pack(layout.size, cmd, frame.timestamp, *body)
    except struct.error as exc:
        raise ValueError(f"cannot encode {frame!r}: {exc}") from None


def check_header(length: int, cmd: int) -> None:
    """Validate a frame header before its body is buffered."""
    if length > MAX_FRAME:
        raise ProtocolError("oversize", f"length {length} > {MAX_FRAME}")
    expected = FRAME_SIZES.get(cmd)
    if expected is None:
        raise ProtocolError("command", f"unknown command {cmd}")
    if length != expected:
        raise ProtocolError("length", f"command {cmd} is {expected} bytes, got {length}")


def _build(cmd: int, values: tuple[int, ...]) -> Frame:
    # values = (length, cmd, timestamp, *body)
    ts = values[2]
    if cmd == Command.ENVELOPE_PUSH:
        eid, amount, count, r1, r2, r3 = values[3:]
        if count != RECIPIENTS:
            raise ProtocolError("body", f"recipient count {count} != {RECIPIENTS}")
        return EnvelopePush(eid, amount, (r1, r2, r3), ts)
    return FRAME_TYPES[cmd](*values[3:], ts)


def decode_frames(buffer: bytes) -> tuple[list[Frame], bytes]:
    """Split ``buffer`` into complete frames and the undecoded rest.

    Raises ProtocolError on the first invalid header; frames before it are
    lost with the connection, which is closed anyway.
    """
    frames: list[Frame] = []
    offset = 0
    end = len(buffer)
    while end - offset >= 4:
        length, cmd = struct.unpack_from(">HH", buffer, offset)
        check_header(length, cmd)
        if end - offset < length:
            break
        frames.append(_build(cmd, LAYOUTS[cmd].unpack_from(buffer, offset)))
        offset += length
    return frames, buffer[offset:]


class Decoder:
    """Incremental decoder: ``feed(bytes)`` returns the frames now complete."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Frame]:
        frames, self._buffer = decode_frames(self._buffer + data)
        return frames

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return len(self._buffer)
