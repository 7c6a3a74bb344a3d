"""The server over real loopback sockets: handoff, envelopes, claims, bad frames, budget."""

from __future__ import annotations

import os
import struct
import time

import pytest

from app import hotpath
from app import protocol as p
from app.local.runner import SERVER_READY, Service, get_json, server_command
from app.server import set_worker
from tests.serverproc import Client


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def per_set_connections(server) -> dict[int, int]:
    return {s["set"]: s["connections"] for s in server.stats()["per_set"]}


def generated(server) -> int:
    return server.stats()["ledger"]["generated"]["count"]


@pytest.fixture(params=["compiled", "pure"])
def hot_path(request, monkeypatch):
    """Both hot paths end to end: the servers a test starts after this inherit the choice."""
    if request.param == "pure":
        monkeypatch.setenv(hotpath.PURE_ENV, "1")
    return request.param


def test_handoff_lands_every_user_on_its_owner_set(server, clients):
    users = range(1, 61)
    for u in users:
        clients(server.port, u)
    per_set = {s["set"]: s["connections"] for s in server.stats()["per_set"]}
    assert per_set == {k: sum(1 for u in users if u % 4 == k) for k in range(4)}
    counters = server.stats()["counters"]
    # Every user not accepted by its owner travelled through an inbox, and none was lost.
    assert counters["logins"] == 60
    # not vacuous: 60 users all accepted by their owner would be a chance of 4**-60
    assert counters.get("handoff.sent", 0) == counters.get("handoff.received", 0) > 0
    assert counters.get("handoff.failed", 0) == 0


def test_every_set_is_scheduled_as_a_batch_task_and_the_supervisor_is_not(server):
    """A SET must not preempt a client writing it a burst (app.arbiter.batch_scheduling)."""
    pids = server.set_pids()
    assert len(pids) == 4
    assert all(os.sched_getscheduler(pid) == os.SCHED_BATCH for pid in pids)
    assert os.sched_getscheduler(server.proc.pid) == os.SCHED_OTHER


def test_the_sets_coalesce_by_their_count_unless_told(start_server):
    """'auto' (the default) is the SET count's rule; a number given is used as is."""
    auto = start_server(sets=2)
    assert {s["reactor"]["coalesce_ms"] for s in auto.stats()["per_set"]} == {
        set_worker.auto_coalesce_ms(2)}
    told = start_server(sets=2, extra=["--coalesce-ms", "3"], journal="told")
    assert {s["reactor"]["coalesce_ms"] for s in told.stats()["per_set"]} == {3}


def test_more_sets_on_one_machine_coalesce_longer():
    few, many = set_worker.auto_coalesce_ms(11), set_worker.auto_coalesce_ms(51)
    assert few == set_worker.COALESCE_FEW_MS < many == set_worker.COALESCE_MANY_MS
    assert set_worker.auto_coalesce_ms(set_worker.MANY_SETS) == few
    assert set_worker.auto_coalesce_ms(set_worker.MANY_SETS + 1) == many


def test_login_result_carries_the_userid_and_zero_is_a_user(server, clients):
    ok = clients(server.port).login(77)
    assert ok == p.LoginResult(77, p.LoginCode.OK, ok.timestamp)
    # The classic prototype logs user 0 in (its client's users start at 0): so do we,
    # and SHAKE/CLAIM naming userid 0 then mean user 0 (issue 11).
    zero = clients(server.port)
    result = zero.login(0)
    assert result == p.LoginResult(0, p.LoginCode.OK, result.timestamp)
    answer = zero.shake(0)
    assert (answer.userid, answer.result) == (0, p.ShakeCode.NONE_LEFT)
    refused = zero.shake(77)
    assert (refused.userid, refused.result) == (0, p.ShakeCode.REFUSED)
    assert per_set_connections(server)[0] == 1


def test_exact_shake_results_for_a_known_supply(hot_path, start_server, clients):
    server = start_server()
    conns = [clients(server.port, u) for u in range(1, 41)]
    assert server.get("/yaohongbao?qps=400&sum=25")["ok"]
    wait_for(lambda: generated(server) == 25)
    results = [c.shake().result for c in conns]
    assert results.count(p.ShakeCode.GOT) == 25
    assert results.count(p.ShakeCode.NONE_LEFT) == 15
    ledger = server.stats(audit=True)["ledger"]
    assert ledger["granted"]["count"] == 25 and ledger["waiting"]["count"] == 0
    assert ledger["balanced"]
    # Per-second counts by the client's sent second add up to what was sent.
    # Wait until the second(s) the shakes were sent in are complete on the server.
    rows = wait_for(lambda: (r := server.stats()["per_second"])
                    and sum(row["shakes"] for row in r) == 40 and r)
    totals = {code: sum(r["by_result"][code] for r in rows) for code in ("14", "15", "17")}
    assert totals == {"14": 25, "15": 15, "17": 0}


def test_granted_envelopes_are_distinct_and_amounts_add_up(server, clients):
    conns = [clients(server.port, u) for u in range(1, 21)]
    server.get("/yaohongbao?qps=1000&sum=20")
    wait_for(lambda: generated(server) == 20)
    got = [c.shake() for c in conns]
    assert all(r.result == p.ShakeCode.GOT for r in got)
    assert len({r.envelope_id for r in got}) == 20
    assert all(r.userid == c.userid for r, c in zip(got, conns, strict=True))
    ledger = server.stats(audit=True)["ledger"]
    assert ledger["granted"]["amount"] == sum(r.amount for r in got)
    assert all(1 <= r.amount <= 500 for r in got)


def test_over_budget_answers_17_at_once(hot_path, start_server, clients):
    # budget 8/s over 4 SETs = 2 per SET per second
    server = start_server(extra=["--shake-budget", "8"])
    c = clients(server.port, 4)  # SET 0
    c.send(*[p.Shake(0, int(time.time())) for _ in range(5)])  # one write: one batch
    codes = [c.recv_type(p.ShakeResult).result for _ in range(5)]
    assert codes.count(p.ShakeCode.OVERLOAD) == 3
    assert codes.count(p.ShakeCode.NONE_LEFT) == 2


def test_userid_of_someone_else_is_refused(server, clients):
    c = clients(server.port, 5)
    assert c.shake(userid=6).result == p.ShakeCode.REFUSED
    assert c.shake(userid=5).result == p.ShakeCode.NONE_LEFT
    assert c.shake(userid=0).result == p.ShakeCode.NONE_LEFT


def test_group_envelope_reaches_exactly_three_recipients_and_claims_once(server, clients):
    # Users 1..40; SET 2 owns 2, 6, 10, ... 38 (10 users).
    conns = {u: clients(server.port, u) for u in range(1, 41)}
    # 4 per SET over 4 SETs: only in SET 2's share does the range [2, 38] matter;
    # every SET owns >= 3 users in [1, 40], so each makes exactly one envelope.
    assert server.get("/fahongbao?qps=40&sum=4&min=1&max=40")["ok"]
    wait_for(lambda: server.stats()["group"]["created"] == 4)
    pushes = {}
    for u, c in conns.items():
        try:
            frame = c.recv_type(p.EnvelopePush, timeout=0.3)
        except TimeoutError:
            continue
        pushes.setdefault(frame.envelope_id, {})[u] = frame
    assert len(pushes) == 4
    for eid, got in pushes.items():
        recipients = next(iter(got.values())).recipients
        assert sorted(got) == sorted(recipients) and len(set(recipients)) == 3
        assert len({u % 4 for u in recipients}) == 1  # one SET's users
        outsider = next(u for u in conns if u not in recipients and u % 4 == recipients[0] % 4)
        assert conns[outsider].claim(eid).amount == 0
        for u, push in got.items():
            assert conns[u].claim(eid).amount == push.amount > 0
            assert conns[u].claim(eid).amount == 0  # second claim
    ledger = server.stats(audit=True)["ledger"]
    assert ledger["claims_granted"] == 12 and ledger["waiting"]["count"] == 0
    assert ledger["generated"]["amount"] == ledger["granted"]["amount"]
    assert ledger["balanced"]


def test_unclaimed_shares_expire_back_to_the_ledger(start_server, clients):
    server = start_server(extra=["--claim-ttl", "1"])
    conns = [clients(server.port, u) for u in range(1, 13)]
    server.get("/fahongbao?qps=40&sum=4&min=1&max=12")
    wait_for(lambda: server.stats()["group"]["created"] == 4)
    ledger = wait_for(lambda: (lg := server.stats(audit=True)["ledger"])["expired"]["count"] == 12
                      and lg, timeout=5)
    assert ledger["waiting"]["count"] == 0 and ledger["balanced"]
    push = conns[0].recv_type(p.EnvelopePush, timeout=1)
    assert conns[0].claim(push.envelope_id).amount == 0  # too late


@pytest.mark.parametrize(
    "bad",
    [
        struct.pack(">HHQI", 17, 2, 0, 1) + b"x",  # wrong length for SHAKE
        struct.pack(">HHQI", 16, 99, 0, 1),  # unknown command
        struct.pack(">HH", 5000, 2) + b"\0" * 100,  # oversize
        b"GET / HTTP/1.1\r\n\r\n",  # garbage
        p.encode(p.ShakeResult(1, 14, 1, 1)),  # server-to-client command
        p.encode(p.Login(9)),  # second login on the same connection
    ],
    ids=["length", "command", "oversize", "garbage", "direction", "login-twice"],
)
def test_malformed_frame_closes_only_that_connection(server, clients, bad):
    good = clients(server.port, 1)
    victim = clients(server.port, 2)
    before = server.stats()["counters"].get("protocol_errors", 0)
    victim.send_raw(bad)
    assert victim.is_closed()
    assert good.shake().result == p.ShakeCode.NONE_LEFT
    assert server.stats()["counters"]["protocol_errors"] == before + 1


def test_first_frame_must_be_login(server, clients):
    c = clients(server.port)
    c.send(p.Shake(3))
    assert c.is_closed()
    assert server.stats()["counters"]["protocol_error.login_first"] == 1


def test_silent_connection_times_out(start_server, clients):
    server = start_server(extra=["--login-timeout", "1"])
    silent = clients(server.port)
    assert not silent.is_closed(timeout=0.5)
    assert silent.is_closed(timeout=3)
    assert server.stats()["counters"]["close.login_timeout"] == 1


def test_second_login_replaces_the_first(server, clients):
    first = clients(server.port, 9)
    second = clients(server.port, 9)
    assert first.is_closed()
    assert second.shake().result == p.ShakeCode.NONE_LEFT
    stats = server.stats()
    assert stats["connections"] == 1 and stats["counters"]["close.replaced"] == 1


def test_frames_split_byte_by_byte_are_served(server, clients):
    c = clients(server.port)
    data = p.encode(p.Login(11)) + p.encode(p.Shake(0))
    for i in range(len(data)):
        c.send_raw(data[i : i + 1])
        time.sleep(0.001)
    assert c.recv_type(p.LoginResult).result == 0
    assert c.recv_type(p.ShakeResult).result == p.ShakeCode.NONE_LEFT


def test_login_and_frames_in_one_write_survive_the_handoff(server, clients):
    c = clients(server.port)
    # Whatever SET accepts it, user 7 belongs to SET 3: the shake rides along.
    c.send_raw(p.encode(p.Login(7)) + p.encode(p.Shake(0)) + p.encode(p.Shake(0)))
    assert c.recv_type(p.LoginResult).result == 0
    assert [c.recv_type(p.ShakeResult).result for _ in range(2)] == [15, 15]


def test_out_of_descriptors_the_set_pauses_accepting_and_comes_back(tmp_path):
    """EMFILE is handled by the StreamServer's own backoff: counted, no busy loop, no crash;
    the connections the kernel held in the backlog log in once descriptors are free."""
    cmd = ["prlimit", "--nofile=160:160",
           *server_command(tmp_path / "journal", 1, extra=["--log-level", "warning"])]
    service = Service("server", cmd, tmp_path / "server.log", SERVER_READY)
    match = service.start(30)
    port, control = int(match.group(1)), f"{match.group(2)}:{match.group(3)}"
    held: list[Client] = []
    try:
        for u in range(1, 201):  # more than the SET has descriptors for
            client = Client(port, timeout=10)
            client.send(p.Login(u))
            held.append(client)
        # the SET reads logins a coalescing sleep after it accepted them: wait for both
        counters = wait_for(lambda: (c := get_json(control, "/stats")["counters"]).get(
            "accept_exhausted") and c.get("logins", 0) > 100 and c)
        served = counters["logins"]
        assert 100 < served < 200
        for client in held[:100]:  # free descriptors: the waiting ones get in
            client.close()
        for client in held[100:]:
            assert client.recv_type(p.LoginResult, timeout=10).result == p.LoginCode.OK
        assert get_json(control, "/stats")["counters"]["logins"] >= 200
    finally:
        for client in held:
            client.close()
        service.stop(15.0)
