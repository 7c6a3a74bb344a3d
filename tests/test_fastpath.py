"""The compiled hot paths against their pure-Python references, on real sockets.

``app.server._fastset`` and ``app.client._fastclient`` must do exactly what
``app.server.fastpath`` and ``app.client.fastpath`` do: each test builds the
same scenario twice (fresh socket pairs), runs each implementation on one,
and compares everything observable — return values, the records' fields,
the bytes the peers received. When the extension is not built the compiled
cases skip, unless HONGBAO_COMPILED_REQUIRED=1 (set by .ci/run) makes that
a failure.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import hotpath
from app import protocol as p
from app.client import fastpath as client_ref
from app.client.histogram import Histogram
from app.client.worker import READY
from app.client.worker import Conn as ClientConn
from app.server import fastpath as server_ref
from app.server.transport import Conn as ServerConn
from app.server.transport import Transport

IN = select.EPOLLIN
SHAKE = struct.Struct(">HHQI")
RESULT = struct.Struct(">HHQIIII")
SECOND = 1_800_000_000


def compiled(name: str):
    module = hotpath.compiled(name)
    if module is None:
        if os.environ.get("HONGBAO_COMPILED_REQUIRED") == "1":
            pytest.fail(f"{name} is not built (pip install -e . with a C compiler)")
        pytest.skip(f"{name} is not built")
    return module


def server_impls():
    fast = compiled("app.server._fastset")
    for module in (server_ref, fast):
        module.bind(ServerConn, p.Phase.OPEN)
    return server_ref, fast


def client_impls():
    fast = compiled("app.client._fastclient")
    for module in (client_ref, fast):
        module.bind(ClientConn, p.ClientSession, p.Phase.OPEN, READY)
    return client_ref, fast


@pytest.fixture
def sockets():
    """Socket pairs made by the test, all closed at the end."""
    made: list[socket.socket] = []

    def pair() -> tuple[int, socket.socket]:
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        made.extend((a, b))
        return a.fileno(), b

    yield pair
    for s in made:
        s.close()


def shake(userid: int = 0, sent: int = SECOND) -> bytes:
    return SHAKE.pack(16, 2, sent, userid)


# ---------------------------------------------------------------- the SET side
class NoReactor:
    def register(self, *args) -> None:
        pass

    unregister = modify = register



def server_scenario(pair):
    """Connections in every case ``read_shakes`` tells apart; (events, conns, names)."""
    cases = {
        "one": (7, shake(), {}),
        "two": (8, shake() + shake(8, SECOND - 1), {}),
        "other_user": (9, shake(10), {}),
        "claim": (11, p.encode(p.Claim(0, 5, SECOND)), {}),
        "partial": (12, shake()[:10], {}),
        "nothing": (13, b"", {}),
        "closed": (14, None, {}),
        "not_logged_in": (15, shake(), {"login": False}),
        "blocked": (16, shake(), {"blocked": True}),
        "queued": (17, shake(), {"out": b"x"}),
        "held_bytes": (18, shake(), {"buf": b"\x00"}),
        "with_write": (19, shake(), {"mask": IN | select.EPOLLOUT}),
    }
    events, conns, names, peers = [], {}, {}, {}
    for name, (userid, data, opts) in cases.items():
        fd, peer = pair()
        conn = ServerConn(fd)
        if opts.get("login", True):
            conn.resume(userid)
        conn.blocked = opts.get("blocked", False)
        conn.out = opts.get("out", b"")
        conn._buf = opts.get("buf", b"")
        if data is None:
            peer.close()
        elif data:
            peer.send(data)
        conns[fd] = conn
        names[id(conn)] = name
        peers[name] = peer
        events.append((fd, opts.get("mask", IN)))
    events.append((999_999, IN))  # not a connection (the inbox, a hand-off pipe)
    return events, conns, names, peers


def test_read_shakes_splits_a_batch_the_same_way(sockets):
    outcomes = []
    for impl in server_impls():
        events, conns, names, _ = server_scenario(sockets)
        rest, got, shakers, sents = impl.read_shakes(events, conns, 4096)
        fd_name = {fd: names[id(c)] for fd, c in conns.items()}
        outcomes.append((
            sorted(fd_name.get(fd, "unknown") for fd, _ in rest),
            sorted((names[id(c)], data) for c, data in got),
            [names[id(c)] for c in shakers], sents))
    assert outcomes[0] == outcomes[1]
    rest, got, shakers, sents = outcomes[0]
    assert rest == sorted(["not_logged_in", "blocked", "queued", "held_bytes", "with_write",
                           "unknown"])
    assert dict(got) == {"other_user": shake(10), "claim": p.encode(p.Claim(0, 5, SECOND)),
                         "partial": shake()[:10], "closed": None}
    assert shakers == ["one", "two", "two"] and sents == [SECOND, SECOND, SECOND - 1]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(min_size=1, max_size=80),
    st.lists(st.sampled_from([shake(), shake(5), shake(6), shake(0, 1)]), min_size=1,
             max_size=4).map(b"".join)))
def test_read_shakes_takes_only_whole_shakes_of_the_user(sockets, data):
    """Any bytes: the compiled code takes exactly what the reference takes."""
    seen = []
    for impl in server_impls():
        fd, peer = sockets()
        conn = ServerConn(fd)
        conn.resume(5)
        peer.send(data)
        rest, got, shakers, sents = impl.read_shakes([(fd, IN)], {fd: conn}, 4096)
        seen.append((len(rest), [d for _, d in got], len(shakers), sents))
    assert seen[0] == seen[1]


def test_queue_results_answers_in_order_and_leaves_queued_ones_to_send(sockets):
    outcomes = []
    for impl in server_impls():
        conns = []
        for userid in (1, 2, 3, 4):
            fd, _ = sockets()
            conn = ServerConn(fd)
            conn.resume(userid)
            conns.append(conn)
        conns[2].out = b"queued"  # goes through send()
        conns[3].blocked = True  # queued, not made dirty (it waits for EPOLLOUT)
        shakers = [conns[0], conns[1], conns[2], conns[3], conns[0]]
        transport, sent = Transport(NoReactor(), lambda name: None), []

        def send(conn, data, sent=sent, transport=transport):
            sent.append((conn.userid, data))
            transport.send(conn, data)

        impl.queue_results(shakers, [(11, 500)], 3, SECOND, transport.dirty, send)
        outcomes.append(([c.out for c in conns], [c.userid for c in transport.dirty]))
        # the compiled code inlines send()'s first case (nothing queued yet) and calls it
        # for the others; the reference calls it every time
        assert (3, RESULT.pack(28, 3, SECOND, 3, 15, 0, 0)) in sent
    assert outcomes[0] == outcomes[1]
    outs, dirty = outcomes[0]

    def answer(userid, code, eid=0, amount=0):
        return RESULT.pack(28, 3, SECOND, userid, code, eid, amount)

    assert outs[0] == answer(1, 14, 11, 500) + answer(1, 17)  # granted; later over budget
    assert outs[1] == answer(2, 15)  # admitted, none left
    assert outs[2] == b"queued" + answer(3, 15)
    assert outs[3] == answer(4, 17)
    assert dirty == [1, 2]


def test_write_out_writes_and_returns_what_did_not_go(sockets):
    outcomes = []
    for impl in server_impls():
        conns, by_fd, peers = [], {}, []
        for _ in range(5):
            fd, peer = sockets()
            conn = ServerConn(fd)
            conn.resume(1)
            conn.out = b"answer"
            conns.append(conn)
            by_fd[fd] = conn
            peers.append(peer)
        peers[1].close()  # gone: EPIPE
        conns[2].blocked = True  # skipped: waits for EPOLLOUT
        del by_fd[conns[3].fd]  # skipped: closed meanwhile
        big = b"z" * (8 << 20)
        conns[4].out = big  # more than the socket takes
        left = impl.write_out(conns, by_fd)
        index = {id(c): i for i, c in enumerate(conns)}
        received = [peers[0].recv(100)]
        outcomes.append(([(index[id(c)], None if r is None else len(r)) for c, r in left],
                         [c.out[:6] for c in conns[:4]], received))
    assert outcomes[0] == outcomes[1]
    left, outs, received = outcomes[0]
    assert left[0] == (1, None) and left[1][0] == 4 and 0 < left[1][1] < 8 << 20
    assert len(left) == 2 and outs == [b"", b"answer", b"answer", b"answer"]
    assert received == [b"answer"]


# ------------------------------------------------------------ the client side
def client_conn(pair, userid: int, state: int = READY, sent_at: float = 0.0):
    fd, peer = pair()
    conn = ClientConn(userid - 100, userid)
    conn.fd, conn.state, conn.sent_at = fd, state, sent_at
    conn.session = p.ClientSession(userid)
    conn.session.phase = p.Phase.OPEN
    return conn, peer


def test_send_shakes_asks_each_user_under_the_closed_loop(sockets):
    outcomes = []
    for impl in client_impls():
        made = [client_conn(sockets, 100 + i) for i in range(6)]
        conns = [c for c, _ in made]
        conns[1].sent_at = 5.0  # unanswered: busy
        conns[2].state = 0  # down: skipped
        conns[3].out = b"q"  # something queued: through send()
        made[4][1].close()  # gone: the write fails, send() drops it
        calls = []

        def send(conn, data, now, calls=calls):
            calls.append((conn.userid, data, now))
            if conn.userid == 104:
                conn.state = 0
            else:
                conn.out += data

        before = time.time()
        result = impl.send_shakes(conns, SECOND, 7.5, 10, 3, send)
        after = time.time()

        def sent_at(conn, before=before, after=after):  # the write's own time, not the tick's
            return "at its write" if before <= conn.sent_at <= after else conn.sent_at

        received = [peer.recv(100) if i in (0, 5) else None for i, (_, peer) in enumerate(made)]
        outcomes.append((result, [(sent_at(c), c.asks, c.asked, c.out) for c in conns], calls,
                         received))
        capped = impl.send_shakes([client_conn(sockets, 200)[0]], SECOND, 7.5, 4, 4, send)
        outcomes[-1] += (capped,)
    assert outcomes[0] == outcomes[1]
    result, fields, calls, received, capped = outcomes[0]
    assert result == (3, 2, 1, 6)  # sent 0, 3, 5; skipped 2, 4; busy 1; 3 more outstanding
    assert fields[0] == ("at its write", 1, SECOND, b"") and fields[1] == (5.0, 0, 0, b"")
    assert fields[3] == ("at its write", 1, SECOND, b"q" + shake(103))
    assert [c[:2] for c in calls] == [(103, shake(103)), (104, shake(104))]
    assert received[0] == shake(100) and received[5] == shake(105)
    assert capped == (0, 0, 1, 4)  # the process is already cap answers behind


def test_read_answers_counts_lone_results_and_passes_the_rest_on(sockets):
    outcomes = []
    for impl in client_impls():
        cases = {
            "one": (RESULT.pack(28, 3, SECOND, 1, 14, 9, 300), 7.0),
            "two": (RESULT.pack(28, 3, SECOND, 2, 15, 0, 0) * 2, 7.0),
            "unasked": (RESULT.pack(28, 3, SECOND, 3, 15, 0, 0), 0.0),
            "over": (RESULT.pack(28, 3, SECOND, 4, 17, 0, 0), 0.0),  # answered, not served
            "push": (p.encode(p.EnvelopePush(5, 10, (1, 2, 3), SECOND)), 7.0),
            "half": (RESULT.pack(28, 3, SECOND, 1, 14, 9, 300)[:20], 7.0),
            "closed": (None, 7.0),
        }
        events, by_fd, names = [], {}, {}
        for i, (name, (data, sent_at)) in enumerate(cases.items()):
            conn, peer = client_conn(sockets, 100 + i, sent_at=sent_at)
            if data is None:
                peer.close()
            else:
                peer.send(data)
            by_fd[conn.fd] = conn
            names[id(conn)] = name
            events.append((conn.fd, IN))
        queued, _ = client_conn(sockets, 150, sent_at=7.0)
        queued.out = b"x"  # not plain: left to the general path
        by_fd[queued.fd] = queued
        names[id(queued)] = "queued"
        events.append((queued.fd, IN))
        hist, results, by_second, served = Histogram(), {}, {}, {}
        rest, got, *counts = impl.read_answers(events, by_fd, 4096, 7.25, hist, results,
                                               by_second, served)
        outcomes.append(([names[id(by_fd[fd])] for fd, _ in rest],
                         sorted((names[id(c)], d) for c, d in got), counts, hist.counts,
                         hist.total, results, by_second, served,
                         {names[id(c)]: c.sent_at for c in by_fd.values()}))
    assert outcomes[0] == outcomes[1]
    rest, got, counts, hist_counts, total, results, by_second, served, sent_at = outcomes[0]
    assert rest == ["queued"] and [name for name, _ in got] == ["closed", "half", "push"]
    assert counts == [5, 300, 2]  # answered, amount granted, unanswered SHAKEs released
    # socket pairs do not stamp: arrival is when read (now = 7.25), 250 ms each, one bucket
    assert total == 2 and sum(hist_counts.values()) == 2 and by_second == {7: 5}
    assert results == {14: 1, 15: 3, 17: 1} and served == {7: 4}
    assert sent_at["one"] == sent_at["two"] == 0.0 and sent_at["push"] == 7.0


def test_read_answers_measures_from_the_kernels_arrival_stamp_not_the_read():
    """A worker that reads late (no CPU on a shared box) still measures the server:
    latency and the answer's second come from the socket's SO_TIMESTAMPNS stamp."""
    from app.client.histogram import bucket
    from app.reactor import SO_TIMESTAMPNS

    outcomes = []
    for impl in client_impls():
        listener = socket.create_server(("127.0.0.1", 0))
        reader = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        try:
            reader.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            wait_until_the_kernel_stamps()
            reader.setblocking(False)
            conn = ClientConn(1, 101)
            conn.fd, conn.state = reader.fileno(), READY
            conn.session = p.ClientSession(101)
            conn.session.phase = p.Phase.OPEN
            conn.sent_at = time.time()
            server.send(RESULT.pack(28, 3, SECOND, 101, 15, 0, 0))
            arrived = time.time()
            time.sleep(0.3)  # the worker gets to it late
            select.select([reader], [], [], 5)
            hist, results, by_second, served = Histogram(), {}, {}, {}
            now = time.time() + 5.0  # and reads it in a later second still
            rest, got, answered, _, released = impl.read_answers(
                [(conn.fd, IN)], {conn.fd: conn}, 4096, now, hist, results, by_second, served)
            outcomes.append((rest, got, answered, released, by_second, hist.counts))
            assert (rest, got, answered, released) == ([], [], 1, 1)
            assert by_second == {int(arrived): 1} or by_second == {int(arrived) + 1: 1}
            assert served == by_second  # 15, none left: it served the ask
            (measured,) = hist.counts
            assert measured <= bucket(100_000)  # not the 300 ms + 5 s until the read
        finally:
            for s in (reader, server, listener):
                s.close()
    assert len(outcomes) == 2


def test_read_answers_adds_a_batchs_counts_to_what_the_dicts_held():
    """The compiled path keeps a batch's counts in C and adds them once at its end:
    answers that arrived in two seconds, a result code outside its small table, and
    counts already in the dicts come out as the reference module counts them."""
    from app.reactor import SO_TIMESTAMPNS

    outcomes = []
    for impl in client_impls():
        listener = socket.create_server(("127.0.0.1", 0))
        pairs, conns = [], []
        try:
            for userid in (101, 102, 103):
                reader = socket.create_connection(listener.getsockname())
                server, _ = listener.accept()
                reader.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                reader.setblocking(False)
                conn = ClientConn(1, userid)
                conn.fd, conn.state = reader.fileno(), READY
                conn.session = p.ClientSession(userid)
                conn.session.phase = p.Phase.OPEN
                conn.sent_at = time.time()
                pairs.append((reader, server))
                conns.append(conn)
            # after our readers asked for stamps: they keep them on once the helper saw one
            # (before, the helper's own socket closing could turn them off again for a while)
            wait_until_the_kernel_stamps()
            if time.time() % 1 > 0.8:  # the first answer well inside the second it is stamped in
                time.sleep(1.05 - time.time() % 1)
            first = int(time.time())
            pairs[0][1].send(RESULT.pack(28, 3, SECOND, 101, 15, 0, 0))
            time.sleep(first + 1.02 - time.time())  # the others arrive in the next second
            pairs[1][1].send(RESULT.pack(28, 3, SECOND, 102, 14, 7, 250) * 2)
            pairs[2][1].send(RESULT.pack(28, 3, SECOND, 103, 1000, 0, 0))  # an unknown code
            select.select([pairs[2][0]], [], [], 5)
            time.sleep(0.05)
            hist, results, by_second, served = Histogram(), {15: 5}, {first: 10}, {}
            events = [(c.fd, IN) for c in conns]
            rest, got, *counts = impl.read_answers(events, {c.fd: c for c in conns}, 4096,
                                                   time.time(), hist, results, by_second, served)
            outcomes.append((rest, got, counts, sum(hist.counts.values()), hist.total, results,
                             {t - first: n for t, n in by_second.items()},  # each impl's own
                             {t - first: n for t, n in served.items()}))  # seconds
        finally:
            for pair in pairs:
                for s in pair:
                    s.close()
            listener.close()
    assert outcomes[0] == outcomes[1]
    rest, got, counts, histogrammed, total, results, by_second, served = outcomes[0]
    assert (rest, got) == ([], [])
    assert counts == [4, 500, 3]  # answered, amount granted, unanswered SHAKEs released
    assert histogrammed == total == 3
    assert results == {15: 6, 14: 2, 1000: 1}
    assert by_second == {0: 11, 1: 3} and served == {0: 1, 1: 2}


def wait_until_the_kernel_stamps(timeout: float = 5.0) -> None:
    """Linux turns receive stamps on machine-wide only once a socket asks, and when none
    had, it does so from a deferred work item: a TCP segment that arrives before that
    carries no stamp at all. Exchange bytes on a stamped pair of our own until one has."""
    from app.reactor import SO_TIMESTAMPNS, STAMP_SPACE

    listener = socket.create_server(("127.0.0.1", 0))
    reader = socket.create_connection(listener.getsockname())
    writer, _ = listener.accept()
    try:
        reader.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        deadline = time.time() + timeout
        while time.time() < deadline:
            writer.send(b"x")
            _, ancillary, _, _ = reader.recvmsg(16, STAMP_SPACE)
            if ancillary:
                return
            time.sleep(0.01)
        raise AssertionError("the kernel never stamped a received segment")
    finally:
        for s in (reader, writer, listener):
            s.close()


def test_the_worker_and_the_set_run_the_compiled_path_when_it_is_built():
    """What ``make smoke`` and the benches run: the compiled modules, bound to the records."""
    from app.client import worker
    from app.server import transport

    compiled("app.server._fastset")
    compiled("app.client._fastclient")
    assert transport.HOT.__name__ == "app.server._fastset"
    assert worker.HOT.__name__ == "app.client._fastclient"
    assert hotpath.describe().startswith("compiled")
