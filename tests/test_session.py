"""The protocol sessions with no sockets: rules, every split, trailing bytes, a linked pair."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app import protocol as p
from tests.fuzz_decoder import feed_all

u32 = st.integers(min_value=0, max_value=p.U32_MAX)
ts = st.integers(min_value=0, max_value=2**64 - 1)
ME = 41

# Requests after the login, with the event the server session must make of each.
requests = st.one_of(
    st.builds(p.Shake, st.sampled_from([0, ME]), ts),
    st.builds(p.Shake, u32.filter(lambda u: u not in (0, ME)), ts),
    st.builds(p.Claim, st.sampled_from([0, ME]), u32, ts),
    st.builds(p.Claim, u32.filter(lambda u: u not in (0, ME)), u32, ts),
)
answers = st.one_of(
    st.builds(p.ShakeResult, u32, u32, u32, u32, ts),
    st.builds(p.EnvelopePush, u32, u32, st.tuples(u32, u32, u32), ts),
    st.builds(p.ClaimResult, u32, u32, ts),
)


def expected_event(frame):
    mine = frame.userid in (0, ME)
    if frame.command == p.Command.SHAKE:
        return p.ShakeAsked(frame.timestamp) if mine else p.ShakeRefused(frame.userid,
                                                                          frame.timestamp)
    if mine:
        return p.ClaimAsked(frame.envelope_id, frame.timestamp)
    return p.ClaimRefused(frame.userid, frame.envelope_id, frame.timestamp)


def stream_of(frames, login=True):
    data = b"".join(p.encode(f) for f in frames)
    return (p.encode(p.Login(ME, 5)) + data) if login else data


@given(st.lists(requests, max_size=20), st.data())
def test_server_any_split_gives_the_same_events(frames, data):
    stream = stream_of(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    events = feed_all(p.ServerSession(), chunks)
    assert events == [p.LoggedIn(ME, 5), *map(expected_event, frames)]


@given(st.lists(requests, min_size=1, max_size=6))
def test_server_one_byte_at_a_time(frames):
    stream = stream_of(frames)
    session = p.ServerSession()
    events = feed_all(session, [stream[i : i + 1] for i in range(len(stream))])
    assert events == [p.LoggedIn(ME, 5), *map(expected_event, frames)]
    assert session.buffered == 0 and session.userid == ME


@given(st.lists(requests, max_size=5), st.binary(min_size=1, max_size=3))
def test_server_trailing_partial_bytes_are_held_back(frames, tail):
    session = p.ServerSession()
    session.resume(ME)
    events = session.receive(stream_of(frames, login=False) + tail)
    assert events == list(map(expected_event, frames))
    assert session.buffered == len(tail)
    assert session.take_buffered() == tail and session.buffered == 0


def test_receive_stops_after_the_login_and_keeps_the_rest_for_a_hand_off():
    rest = p.encode(p.Shake(0, 9)) + p.encode(p.Claim(0, 3, 9))[:7]
    session = p.ServerSession(login_deadline=12.5)
    assert session.receive(p.encode(p.Login(ME, 8)) + rest) == [p.LoggedIn(ME, 8)]
    assert session.logged_in and session.buffered == len(rest)
    owner = p.ServerSession()
    owner.resume(ME)  # the owning SET continues the session with the bytes handed over
    assert owner.receive(session.take_buffered()) == [p.ShakeAsked(9)]
    assert owner.buffered == 7
    assert session.login_deadline == 12.5


def test_user_zero_logs_in_like_anybody_and_zero_still_means_me():
    session = p.ServerSession()
    assert session.receive(p.encode(p.Login(0, 1))) == [p.LoggedIn(0, 1)]
    assert session.receive(p.encode(p.Shake(0, 2)) + p.encode(p.Shake(7, 3))) == [
        p.ShakeAsked(2), p.ShakeRefused(7, 3)]
    assert list(session.receive(p.encode(p.Claim(0, 4, 5)))) == [p.ClaimAsked(4, 5)]


@pytest.mark.parametrize("frames, logged_in, reason", [
    ([p.Shake(0)], False, "login_first"),
    ([p.Claim(0, 1)], False, "login_first"),
    ([p.ShakeResult(1, 14, 1, 1)], False, "login_first"),
    ([p.Login(3)], True, "login_twice"),
    ([p.Shake(0), p.Login(3)], True, "login_twice"),
    ([p.ShakeResult(1, 14, 1, 1)], True, "direction"),
    ([p.EnvelopePush(1, 1, (1, 2, 3))], True, "direction"),
    ([p.LoginResult(1, 0)], True, "direction"),
    ([p.ClaimResult(1, 1)], True, "direction"),
])
def test_server_rules(frames, logged_in, reason):
    session = p.ServerSession()
    if logged_in:
        session.resume(ME)
    data = stream_of(frames, login=False)
    with pytest.raises(p.ProtocolError) as info:
        session.receive(data)
    assert info.value.reason == reason
    assert session.phase == p.Phase.CLOSED
    with pytest.raises(p.ProtocolError) as again:  # a broken session stays broken
        session.receive(p.encode(p.Shake(0)))
    assert again.value.reason == "closed"


@pytest.mark.parametrize("header, reason", [
    (b"\x00\x11\x00\x02", "length"), (b"\x00\x10\x00\x09", "command"),
    (b"\x0f\xa0\x00\x02", "oversize"),
])
def test_bad_header_is_refused_before_its_body_arrives(header, reason):
    session = p.ServerSession()
    session.resume(ME)
    with pytest.raises(p.ProtocolError) as info:
        session.receive(header)
    assert info.value.reason == reason


def test_server_answers_carry_the_sessions_user():
    session = p.ServerSession()
    session.resume(ME)
    assert p.decode_frames(session.login_result(p.LoginCode.OK, 3))[0] == [
        p.LoginResult(ME, p.LoginCode.OK, 3)]
    assert p.decode_frames(session.shake_result(14, 5, 6, 3))[0] == [
        p.ShakeResult(ME, 14, 5, 6, 3)]
    assert p.decode_frames(session.push(5, 7, (1, 2, 3), 3))[0] == [
        p.EnvelopePush(5, 7, (1, 2, 3), 3)]
    assert p.decode_frames(session.claim_result(5, 7, 3))[0] == [p.ClaimResult(5, 7, 3)]


@given(st.lists(requests, min_size=1, max_size=8))
def test_server_whole_frames_one_a_read_give_the_same_events(frames):
    """One whole SHAKE or CLAIM a read (the common case, decoded by a shortcut):
    the events the general decoder makes of the same bytes in one read."""
    session = p.ServerSession()
    session.resume(ME)
    one_by_one = [e for f in frames for e in session.receive(p.encode(f))]
    assert one_by_one == list(map(expected_event, frames)) == list(
        p.ServerSession.receive(_resumed(), stream_of(frames, login=False)))
    assert session.buffered == 0


def _resumed() -> p.ServerSession:
    session = p.ServerSession()
    session.resume(ME)
    return session


@given(st.lists(answers, min_size=1, max_size=8))
def test_client_whole_frames_one_a_read_give_the_same_frames(frames):
    """One whole SHAKE_RESULT, ENVELOPE_PUSH or CLAIM_RESULT a read (shortcuts): the
    frames the general decoder returns for the same bytes in one read."""
    session = p.ClientSession(ME)
    session.receive(p.encode(p.LoginResult(ME, 0, 1)))
    one_by_one = [e for f in frames for e in session.receive(p.encode(f))]
    together = p.ClientSession(ME)
    together.receive(p.encode(p.LoginResult(ME, 0, 1)))
    assert one_by_one == frames == list(together.receive(b"".join(p.encode(f) for f in frames)))


@given(st.lists(answers, max_size=20), st.data())
def test_client_any_split_gives_the_same_frames(frames, data):
    stream = p.encode(p.LoginResult(ME, 0, 1)) + b"".join(p.encode(f) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    session = p.ClientSession(ME)
    got = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got.extend(session.receive(stream[a:b]))
    assert got == [p.LoginResult(ME, 0, 1), *frames]
    assert session.logged_in and session.buffered == 0


@given(st.lists(answers, min_size=1, max_size=5), st.binary(min_size=1, max_size=3))
def test_client_one_byte_at_a_time_and_trailing_bytes(frames, tail):
    stream = p.encode(p.LoginResult(ME, 0, 1)) + b"".join(p.encode(f) for f in frames)
    session = p.ClientSession(ME)
    got = []
    for i in range(len(stream)):
        got.extend(session.receive(stream[i : i + 1]))
    assert got == [p.LoginResult(ME, 0, 1), *frames]
    assert session.receive(tail) == [] and session.buffered == len(tail)


@pytest.mark.parametrize("frames, reason", [
    ([p.ShakeResult(1, 14, 1, 1)], "login_first"),
    ([p.LoginResult(ME, p.LoginCode.WRONG_SET)], "login"),
    ([p.LoginResult(ME, 0), p.LoginResult(ME, 0)], "login_twice"),
    ([p.LoginResult(ME, 0), p.Shake(0)], "direction"),
    ([p.LoginResult(ME, 0), p.Login(1)], "direction"),
])
def test_client_rules(frames, reason):
    session = p.ClientSession(ME)
    with pytest.raises(p.ProtocolError) as info:
        session.receive(b"".join(p.encode(f) for f in frames))
    assert info.value.reason == reason


@pytest.mark.parametrize("alone", [True, False], ids=["alone", "after a frame"])
def test_push_naming_two_recipients_is_refused_by_the_client(alone):
    session = p.ClientSession(ME)
    session.receive(p.encode(p.LoginResult(ME, 0)))
    bad = bytearray(p.encode(p.EnvelopePush(1, 2, (3, 4, 5))))
    bad[23] = 2  # the recipient count field
    before = b"" if alone else p.encode(p.ClaimResult(1, 2, 3))
    with pytest.raises(p.ProtocolError) as info:
        session.receive(before + bytes(bad))
    assert info.value.reason == "body"


def test_a_client_and_a_server_linked_in_memory():
    client, server = p.ClientSession(ME), p.ServerSession()
    wire = client.login(10) + client.shake(10) + client.claim(99, 10)
    events = feed_all(server, [wire])
    assert events == [p.LoggedIn(ME, 10), p.ShakeAsked(10), p.ClaimAsked(99, 10)]
    back = (server.login_result(p.LoginCode.OK, 11) + server.shake_result(14, 7, 300, 11)
            + server.push(8, 20, (ME, 2, 3), 11) + server.claim_result(99, 0, 11))
    assert client.receive(back) == [p.LoginResult(ME, 0, 11), p.ShakeResult(ME, 14, 7, 300, 11),
                                    p.EnvelopePush(8, 20, (ME, 2, 3), 11),
                                    p.ClaimResult(99, 0, 11)]


@given(st.binary(max_size=200), st.booleans())
def test_random_bytes_raise_only_protocol_error(blob, logged_in):
    server, client = p.ServerSession(), p.ClientSession(ME)
    for session, feed in ((server, lambda data: feed_all(server, [data])),
                          (client, client.receive)):
        if logged_in:
            session.phase = p.Phase.OPEN
        try:
            feed(blob)
        except p.ProtocolError as exc:
            assert exc.reason in {"oversize", "command", "length", "body", "login_first",
                                  "login_twice", "direction", "login"}
