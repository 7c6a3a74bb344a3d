"""Coverage-guided fuzzing of the sans-IO decoder (atheris/libFuzzer), bounded in time.

Run::

    python -m tests.fuzz_decoder -max_total_time=10 [-seed=1] [CORPUS_DIR ...]

Why: the decoder is the only code that reads bytes from strangers. The
property checked on every input (``check``) is stronger than "does not
crash": the input's first byte picks a chunk size, the rest is fed to an
incremental ``Decoder`` in those chunks and to ``decode_frames`` whole
(and the same for the SET's ``ServerSession``); both must agree (same
frames, or the same ``ProtocolError`` reason), the
decoder never buffers a whole frame's worth (``pending < MAX_FRAME``), only
``ProtocolError`` ever escapes, and every decoded frame re-encodes to
exactly the bytes it came from. ``tests/test_decoder_fuzz.py`` runs this
for a few seconds in the default suite (and the same ``check`` under
hypothesis, which needs no native fuzzer).
"""

from __future__ import annotations

import sys

from app import protocol as p


def check(data: bytes) -> None:
    """The decoder property for one input (raises AssertionError when violated)."""
    if not data:
        return
    step = data[0] % 13 + 1
    body = data[1:]
    try:
        whole, rest = p.decode_frames(body)
        whole_error = None
    except p.ProtocolError as exc:
        whole, rest, whole_error = [], b"", exc.reason
    decoder = p.Decoder()
    fed: list[p.Frame] = []
    fed_error = None
    try:
        for i in range(0, len(body), step):
            fed.extend(decoder.feed(body[i : i + step]))
            assert decoder.pending < p.MAX_FRAME, decoder.pending
    except p.ProtocolError as exc:
        fed_error = exc.reason
    assert fed_error == whole_error, (fed_error, whole_error)
    if whole_error is None:
        assert fed == whole and decoder.pending == len(rest)
        consumed = body[: len(body) - len(rest)]
        assert b"".join(p.encode(f) for f in whole) == consumed
    else:
        # Frames before the bad header are the same ones, whole or in chunks.
        encoded = b"".join(p.encode(f) for f in fed)
        assert body.startswith(encoded)
    check_server_session(body, step)


def feed_all(session: p.ServerSession, chunks: list[bytes]) -> list:
    """Every event of ``chunks`` fed in order; after a LoggedIn, go on with what followed."""
    events: list = []
    for chunk in chunks:
        got = session.receive(chunk)
        while got and type(got[-1]) is p.LoggedIn:
            events.extend(got)
            got = session.receive(b"")
        events.extend(got)
    return events


def _server_events(chunks: list[bytes]) -> tuple[list, str | None]:
    session = p.ServerSession()
    try:
        events = feed_all(session, chunks)
    except p.ProtocolError as exc:
        return [], exc.reason
    assert session.buffered < p.MAX_FRAME, session.buffered
    return events, None


def check_server_session(body: bytes, step: int) -> None:
    """The SET's session decides the same, fed whole or in ``step``-byte chunks."""
    whole, whole_error = _server_events([body])
    fed, fed_error = _server_events([body[i : i + step] for i in range(0, len(body), step)])
    assert fed_error == whole_error, (fed_error, whole_error)
    if whole_error is None:
        assert fed == whole


SEEDS = [
    p.encode(p.Login(7)) + p.encode(p.Shake(0)) + p.encode(p.Claim(0, 9)),
    p.encode(p.EnvelopePush(1, 2, (3, 4, 5))) + p.encode(p.ShakeResult(1, 14, 2, 3)),
    p.encode(p.LoginResult(1, 0)) + p.encode(p.ClaimResult(5, 6)),
]


def main() -> None:
    import atheris

    def one_input(data: bytes) -> None:
        check(data)

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports(include=["app.protocol"]):
        import importlib

        from app.protocol import codec, session

        # Re-import under instrumentation, modules first, then the package that
        # re-exports them: coverage of the codec and the session.
        for module in (codec, session, p):
            importlib.reload(module)
    main()
