"""Authorization: who may claim, who may shake for whom, who may change the server.

Why a module-scoped server: every check here is a request and its answer,
and none changes what another check sees (campaigns are asserted unchanged
after every refusal). The server runs with ``--token T --allow
10.255.255.0/24``, so the loopback address the tests use is *not* allowed:
only the token authorises a state change.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
import urllib.error
import urllib.request

import pytest

from app import protocol as p
from tests import reliability
from tests.reliability import Row, ledger_diff, record
from tests.serverproc import Client, ServerProcess
from tests.test_server import wait_for

reliability_table = reliability.reliability_table  # module fixture: prints the table
start_agent = reliability.start_agent

TOKEN = "s3cret-T"
REFUSED: list[str] = []  # bad requests tried, for the table


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("auth") / "journal", sets=2,
                           extra=["--token", TOKEN, "--allow", "10.255.255.0/24"])
    server.start()
    yield server
    server.stop()


def request(server: ServerProcess, path: str, method: str = "GET", body: bytes = b"",
            headers: dict[str, str] | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.control_port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, (json.loads(data) if data.strip() else {})
    finally:
        conn.close()


def read_response(sock: socket.socket) -> str:
    """One whole HTTP response (head and its Content-Length body) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))
    while len(body) < length:
        body += sock.recv(4096)
    return (head + b"\r\n\r\n" + body).decode()


def campaigns(server: ServerProcess) -> list:
    return [s["campaigns"] for s in server.stats()["per_set"]]


# ------------------------------------------------------------ control API
@pytest.mark.parametrize("path,headers", [
    ("/yaohongbao?qps=10&sum=10", {}),
    ("/yaohongbao?qps=10&sum=10&token=wrong", {}),
    ("/yaohongbao?qps=10&sum=10&token=", {}),
    ("/yaohongbao?qps=10&sum=10", {"X-Hongbao-Token": "s3cret-t"}),
    ("/fahongbao?qps=1&sum=1&min=1&max=9", {}),
    ("/fahongbao?qps=1&sum=1&min=1&max=9", {"X-Forwarded-For": "10.255.255.1"}),
], ids=["none", "wrong", "empty", "case", "fa-none", "spoofed-forwarded-for"])
def test_state_changes_need_the_token_from_a_disallowed_address(guarded, path, headers):
    before = campaigns(guarded)
    status, body = request(guarded, path, headers=headers)
    REFUSED.append(path)
    assert status == 403 and "token" in body["error"]
    assert campaigns(guarded) == before


def test_the_token_authorises_in_query_or_header(guarded):
    status, body = request(guarded, f"/yaohongbao?qps=0&sum=0&token={TOKEN}")
    assert status == 200 and body["ok"]
    status, body = request(guarded, "/fahongbao?qps=0&sum=0&min=1&max=2",
                           headers={"X-Hongbao-Token": TOKEN})
    assert status == 200 and body["ok"]
    # Reading needs nothing.
    assert request(guarded, "/stats")[0] == 200 and request(guarded, "/health")[0] == 200


@pytest.mark.parametrize("path,words", [
    ("/yaohongbao?sum=10", ["missing", "qps"]),
    ("/yaohongbao?qps=&sum=10", ["missing", "qps"]),
    ("/yaohongbao?qps=ten&sum=10", ["integer", "qps"]),
    ("/yaohongbao?qps=1.5&sum=10", ["integer", "qps"]),
    ("/yaohongbao?qps=-1&sum=10", ["qps", "must be in"]),
    ("/yaohongbao?qps=10000001&sum=10", ["qps", "must be in"]),
    ("/yaohongbao?qps=1&sum=1099511627777", ["sum", "must be in"]),
    ("/fahongbao?qps=1&sum=1&max=9", ["missing", "min"]),
    ("/fahongbao?qps=1&sum=1&min=-1&max=9", ["min", "must be in"]),
    ("/fahongbao?qps=1&sum=1&min=0&max=4", ["holds 5 users", "2 SETs need at least 6"]),
    ("/fahongbao?qps=1&sum=1&min=9&max=3", ["min (9) must not exceed max (3)"]),
    ("/fahongbao?qps=1&sum=1&min=1&max=4294967296", ["max", "must be in"]),
    ("/stats?seconds=901", ["seconds", "must be in"]),
    ("/stats?audit=2", ["audit", "must be in"]),
])
def test_bad_parameters_get_400_with_a_reason(guarded, path, words):
    before = campaigns(guarded)
    sep = "&" if "?" in path else "?"
    status, body = request(guarded, f"{path}{sep}token={TOKEN}")
    REFUSED.append(path)
    assert status == 400, body
    assert all(w in body["error"] for w in words), body
    assert campaigns(guarded) == before


def test_a_group_campaign_may_start_at_user_0_as_the_prototype_script_does(guarded):
    status, body = request(guarded, f"/fahongbao?qps=0&sum=0&min=0&max=9&token={TOKEN}")
    assert status == 200 and body["ok"] and body["min"] == 0, body


@pytest.mark.parametrize("method,path,body,headers,status,words", [
    ("GET", "/nope", b"", {}, 404, ["no such path", "/stats"]),
    ("GET", "/yaohongbao/extra", b"", {}, 404, ["no such path"]),
    ("POST", "/yaohongbao?qps=1&sum=1&token=" + TOKEN, b"", {}, 405, ["only GET"]),
    ("PUT", "/stats", b"x", {}, 405, ["only GET"]),
    ("DELETE", "/fahongbao", b"", {}, 405, ["only GET"]),
    ("POST", "/stats", b"x" * 5000, {}, 413, ["larger than 4096"]),
    ("GET", "/stats", b"", {"Content-Length": "100000"}, 413, ["larger than 4096"]),
    ("GET", "/stats?pad=" + "a" * 3000, b"", {}, 414, ["longer than 2048"]),
    ("GET", "/yaohongbao?token=" + TOKEN + "&pad=" + "a" * 3000, b"", {}, 414, ["longer"]),
], ids=["404", "404-sub", "405-post", "405-put", "405-delete", "413-body", "413-declared",
        "414", "414-with-token"])
def test_http_errors_and_size_limits(guarded, method, path, body, headers, status, words):
    before = campaigns(guarded)
    if "Content-Length" in headers:
        # Declares a body it never sends: the answer must not wait for it.
        raw = socket.create_connection(("127.0.0.1", guarded.control_port), timeout=10)
        try:
            raw.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: "
                        f"{headers['Content-Length']}\r\n\r\n".encode())
            head = read_response(raw)
        finally:
            raw.close()
        got, text = int(head.split()[1]), head
    else:
        got, answer = request(guarded, path, method=method, body=body, headers=headers)
        text = answer.get("error", "")
    REFUSED.append(f"{method} {path[:40]}")
    assert got == status, text
    assert all(w in text for w in words), text
    assert campaigns(guarded) == before


def test_agent_qps_needs_the_token_too(guarded, start_agent):
    agent = start_agent(guarded, (1, 4), token=TOKEN, allow="10.255.255.0/24")

    def get(path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://{agent.api}{path}", timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    assert get("/qps?qps=5")[0] == 403
    assert get("/qps?qps=five&token=" + TOKEN)[0] == 400
    assert agent.get("/stats")["qps"] == 0
    status, body = get("/qps?qps=5&token=" + TOKEN)
    assert status == 200 and body["qps"] == 5
    REFUSED.extend(["agent /qps no token", "agent /qps bad value"])


# ------------------------------------------------------------- the protocol
def test_claims_only_by_a_designated_recipient_and_only_once(guarded):
    users = range(1, 17)  # 8 per SET
    conns = {u: Client(guarded.port) for u in users}
    try:
        for u, c in conns.items():
            assert c.login(u).result == 0
        status, _ = request(guarded, f"/fahongbao?qps=20&sum=2&min=1&max=16&token={TOKEN}")
        assert status == 200
        wait_for(lambda: guarded.stats()["group"]["created"] >= 2)
        pushes: dict[int, dict[int, p.EnvelopePush]] = {}
        for u, c in conns.items():
            try:
                push = c.recv_type(p.EnvelopePush, timeout=0.5)
            except TimeoutError:
                continue
            pushes.setdefault(push.envelope_id, {})[u] = push
        assert len(pushes) == 2 and all(len(got) == 3 for got in pushes.values())
        refused = granted = 0
        anyone = {u for got in pushes.values() for u in got}
        for eid, got in pushes.items():
            a, b, c3 = sorted(got)  # the three recipients
            same_set = next(u for u in users if u not in got and u % 2 == a % 2)
            other_set = next(u for u in users if u % 2 != a % 2 and u not in anyone)
            # Not a recipient (same SET, other SET): nothing.
            assert conns[same_set].claim(eid).amount == 0
            assert conns[other_set].claim(eid).amount == 0
            # A recipient naming another recipient in the frame: refused, and
            # the named one's share stays untouched.
            assert conns[a].claim(eid, userid=b).amount == 0
            assert conns[same_set].claim(eid, userid=a).amount == 0
            refused += 4
            # Each recipient: once (userid 0 = "me", or its own id), never twice.
            assert conns[a].claim(eid).amount == got[a].amount > 0
            assert conns[b].claim(eid, userid=b).amount == got[b].amount
            assert conns[a].claim(eid).amount == 0
            assert conns[b].claim(eid, userid=b).amount == 0
            refused += 2
            # A second login of the same user (replacing the first) gets nothing more,
            # and c3 still gets its share exactly once through the new connection.
            again = Client(guarded.port)
            try:
                assert again.login(a).result == 0
                assert again.claim(eid).amount == 0
                assert conns[a].is_closed()
            finally:
                again.close()
            assert conns[c3].claim(eid).amount == got[c3].amount
            assert conns[c3].claim(eid).amount == 0
            refused += 2
            granted += 3
        ledger = guarded.stats(audit=True)["ledger"]
        shares = sum(push.amount for got in pushes.values() for push in got.values())
        assert ledger["claims_granted"] == granted == 6
        assert ledger["granted"]["amount"] == shares and ledger["balanced"]
        assert guarded.stats()["counters"]["claims.refused"] >= refused
    finally:
        for c in conns.values():
            c.close()
    record(Row("auth: claims (recipients only, once)", bad_inputs=refused,
               ledger_diff=ledger_diff(ledger),
               figures={"shares_granted": granted, "claims_refused": refused}))


def test_shake_for_someone_else_is_refused_and_costs_nothing(guarded):
    status, _ = request(guarded, f"/yaohongbao?qps=1000&sum=4&token={TOKEN}")
    assert status == 200
    wait_for(lambda: guarded.stats()["ledger"]["bucket"]["count"] >= 4)
    before = guarded.stats(audit=True)["ledger"]
    c = Client(guarded.port)
    try:
        assert c.login(101).result == 0
        for other in (102, 103, 1, 0xFFFFFFFF):
            answer = c.shake(userid=other)
            assert answer.result == p.ShakeCode.REFUSED == 16
            assert (answer.userid, answer.envelope_id, answer.amount) == (101, 0, 0)
        assert guarded.stats(audit=True)["ledger"] == before  # nothing moved
        got = c.shake(userid=101)
        assert got.result == p.ShakeCode.GOT and got.userid == 101
        # A CLAIM naming someone else is refused without closing the connection.
        assert c.claim(12345, userid=102).amount == 0
        assert c.shake().result == p.ShakeCode.GOT
    finally:
        c.close()
    REFUSED.extend(["shake as other"] * 4 + ["claim as other"])
    assert guarded.stats(audit=True)["ledger"]["balanced"]


def test_slow_or_silent_http_clients_are_cut_after_the_io_timeout(guarded):
    """Half a request line, or a declared body never sent: closed, not held forever."""
    from app.httpapi import IO_TIMEOUT

    half = socket.create_connection(("127.0.0.1", guarded.control_port), timeout=10)
    declared = socket.create_connection(("127.0.0.1", guarded.control_port), timeout=10)
    try:
        half.sendall(b"GET /yaohong")
        declared.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        assert read_response(declared).startswith("HTTP/1.1 413")
        started = time.time()
        for sock in (half, declared):
            sock.settimeout(IO_TIMEOUT + 5)
            assert sock.recv(4096) == b""  # EOF: the server hung up
        assert time.time() - started < IO_TIMEOUT + 5
    finally:
        half.close()
        declared.close()
    REFUSED.extend(["slow request line", "declared body never sent"])
    assert request(guarded, "/health")[0] == 200
    # The last test of the module: one row for every refusal above.
    ledger = guarded.stats(audit=True)["ledger"]
    record(Row("auth: control API, shake/claim as someone else, slow HTTP",
               bad_inputs=len(REFUSED), ledger_diff=ledger_diff(ledger),
               figures={"refused_requests": len(REFUSED)}))
