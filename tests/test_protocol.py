"""Codec tests with no sockets: round trips, every split, hostile bytes."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app import protocol as p

u32 = st.integers(min_value=0, max_value=p.U32_MAX)
ts = st.integers(min_value=0, max_value=2**64 - 1)

frames = st.one_of(
    st.builds(p.Login, u32, ts),
    st.builds(p.LoginResult, u32, u32, ts),
    st.builds(p.Shake, u32, ts),
    st.builds(p.ShakeResult, u32, u32, u32, u32, ts),
    st.builds(p.EnvelopePush, u32, u32, st.tuples(u32, u32, u32), ts),
    st.builds(p.Claim, u32, u32, ts),
    st.builds(p.ClaimResult, u32, u32, ts),
)


def test_frame_sizes_match_the_spec():
    assert p.HEADER_SIZE == 12
    bodies = {0: 4, 1: 8, 2: 4, 3: 16, 4: 24, 5: 8, 6: 8}
    assert {cmd: size - 12 for cmd, size in p.FRAME_SIZES.items()} == bodies
    assert p.MAX_FRAME == 36


def test_known_bytes_of_a_shake():
    data = p.encode(p.Shake(7, timestamp=1_700_000_000))
    assert data == struct.pack(">HHQI", 16, 2, 1_700_000_000, 7)


def test_known_bytes_of_a_push():
    data = p.encode(p.EnvelopePush(5, 100, (1, 2, 3), 9))
    assert data == struct.pack(">HHQIIIIII", 36, 4, 9, 5, 100, 3, 1, 2, 3)


@given(frames)
def test_round_trip_every_command(frame):
    decoded, rest = p.decode_frames(p.encode(frame))
    assert decoded == [frame] and rest == b""


@given(st.lists(frames, max_size=20), st.data())
def test_any_split_decodes_the_same(frame_list, data):
    stream = b"".join(p.encode(f) for f in frame_list)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = p.Decoder()
    out = []
    last = 0
    for cut in [*cuts, len(stream)]:
        out.extend(decoder.feed(stream[last:cut]))
        last = cut
    assert out == frame_list
    assert decoder.pending == 0


@given(st.lists(frames, min_size=1, max_size=5))
def test_one_byte_at_a_time(frame_list):
    stream = b"".join(p.encode(f) for f in frame_list)
    decoder = p.Decoder()
    out = []
    for i in range(len(stream)):
        out.extend(decoder.feed(stream[i : i + 1]))
    assert out == frame_list


@given(frames, st.binary(min_size=1, max_size=3))
def test_trailing_partial_bytes_are_held_back(frame, tail):
    decoded, rest = p.decode_frames(p.encode(frame) + tail)
    assert decoded == [frame] and rest == tail


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_protocol_error(blob):
    decoder = p.Decoder()
    try:
        decoder.feed(blob)
    except p.ProtocolError as exc:
        assert exc.reason in {"oversize", "command", "length", "body"}


@pytest.mark.parametrize(
    "header, reason",
    [
        (struct.pack(">HH", 17, 2), "length"),  # SHAKE is 16 bytes
        (struct.pack(">HH", 16, 9), "command"),
        (struct.pack(">HH", 4000, 2), "oversize"),
        (struct.pack(">HH", 0, 0), "length"),
    ],
)
def test_bad_header_is_refused_before_the_body_arrives(header, reason):
    with pytest.raises(p.ProtocolError) as info:
        p.Decoder().feed(header)
    assert info.value.reason == reason


def test_push_with_wrong_recipient_count_is_refused():
    data = struct.pack(">HHQIIIIII", 36, 4, 0, 5, 100, 2, 1, 2, 3)
    with pytest.raises(p.ProtocolError) as info:
        p.decode_frames(data)
    assert info.value.reason == "body"


def test_encode_refuses_out_of_range_values():
    with pytest.raises(ValueError):
        p.encode(p.Shake(2**32))
    with pytest.raises(ValueError):
        p.encode(p.EnvelopePush(1, 1, (1, 2)))


def test_direction_sets_cover_every_command():
    assert p.CLIENT_COMMANDS | p.SERVER_COMMANDS == set(p.FRAME_TYPES)
    assert p.CLIENT_COMMANDS == {p.Command.LOGIN, p.Command.SHAKE, p.Command.CLAIM}
