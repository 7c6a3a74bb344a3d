"""Hostile-input harness: many connections of random and mutated frames against a server.

Run (against a server started with, say, ``--login-timeout 3``; a LOGIN sent
one byte at a time must still finish within it)::

    python -m app.fuzz --port 1025 --control 127.0.0.1:8989 --seconds 10 \
        --connections 200 --login-wait 4 [--seed 7] [--json report.json]

Why a harness and not just unit tests: the rules of README's "Wire protocol"
section ("a peer can never crash, stall or slow a SET"; a bad frame closes
that connection and counts a protocol error) are properties of the running
server, with its
hand-offs, batching and timers. ``--connections`` greenlets each run one
*case* after another until the time is up. A case opens a connection,
sends one kind of bad input and waits for the server's verdict. Each case
knows what the server must do — this is the point: the sans-IO session
(``app.protocol.ServerSession``, the rules the SET itself runs) predicts the
outcome of every mutated byte string, so
the harness checks, per connection, that the server closed it (with which
counter) or served it (every valid frame answered), and with ``--control``
it compares the server's ``/stats`` counters with what it sent, exactly.

Cases: wrong lengths, unknown commands, oversize frames, server-to-client
commands, frames before LOGIN (one, or a flood of thousands), random bytes,
bad frames split at every byte, LOGIN of user 0 (a user like any other, as
in the classic prototype; once per run, so that no second login of user 0
replaces the first before the server has seen it closed), logins that
never finish
(nothing sent, or part of a LOGIN), the same after a good LOGIN (wrong
length, unknown command, oversize, direction, a second LOGIN), valid
frames split at every byte, randomly mutated streams of valid frames, and
LOGIN plus up to 4 KB of mutated frames in one write (which ride along in
the SET hand-off).

Userids: logged-in cases use ``--user-base`` + a counter, so they never
replace the logins of well-behaved users running beside the harness.
Exit status: 0 when every connection behaved as predicted (and the
counters matched), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gevent
from gevent import socket

from app import protocol as p

HEAD = struct.Struct(">HH")
CLOSE_WAIT = 10.0  # seconds the server has to close a connection it must close (generous: CI)
ANSWER_WAIT = 10.0  # seconds the server has to answer every valid frame of a served case
SPLIT_PAUSE = 0.001  # seconds between the one-byte writes of a split case
MAX_PAYLOAD = 3000  # bytes after LOGIN in one write: one server read, so one verdict
ONE_READ = 4096  # the SET's READ_SIZE: a first write up to this is one read
COUNTERS = ("accepted", "logins", "protocol_errors", "close.protocol_error",
            "close.login_timeout", "close.peer_closed")


@dataclass
class Plan:
    """What one case sends and what the server must do about it."""

    case: str
    login: int = 0  # userid to log in first (0: no login)
    chunks: list[bytes] = field(default_factory=list)  # written one by one
    expect: str = "served"  # served | protocol_error | login_timeout
    reason: str = ""  # protocol_error.<reason> when expect == protocol_error
    answers: int = 0  # answers a served case must get (SHAKE and CLAIM frames)
    logs_in: bool = False  # a LOGIN inside ``chunks`` (besides ``login``) succeeds

    @property
    def sent_bytes(self) -> int:
        return sum(len(c) for c in self.chunks)


def _pad(data: bytes, length: int) -> bytes:
    """``data`` cut or zero-padded to ``length`` (a frame whose header says ``length``)."""
    return data[:length] + b"\0" * max(0, length - len(data))


def verdict(data: bytes, logged_in: bool) -> tuple[str, str, int]:
    """The server's reaction to ``data`` as one read: (expect, reason, answers).

    Predicted by a ``ServerSession``, the rules the SET runs: a broken rule
    closes the connection with its reason; without a complete LOGIN the
    connection waits for its login timeout; otherwise every SHAKE and CLAIM
    (refused ones included) gets one answer.
    """
    session = p.ServerSession()
    if logged_in:
        session.resume(1)
    try:
        events = session.receive(data)
        if events and type(events[-1]) is p.LoggedIn:  # it stops after a LOGIN: go on
            events += session.receive(b"")
    except p.ProtocolError as exc:
        return "protocol_error", exc.reason, 0
    if not session.logged_in:
        return "login_timeout", "", 0
    return "served", "", sum(1 for e in events if type(e) is not p.LoggedIn)


class Cases:
    """Generators of ``Plan``s, one method per case, chosen by weight."""

    def __init__(self, rng: random.Random, user_base: int) -> None:
        self.rng = rng
        self.next_user = user_base
        self.zero_used = False  # user 0 logs in once per run

    def user(self) -> int:
        self.next_user += 1
        return self.next_user

    # -- bad headers (before or after LOGIN)
    def _bad_header(self, kind: str) -> bytes:
        r = self.rng
        if kind == "length":
            cmd = r.choice(list(p.FRAME_SIZES))
            length = r.choice([n for n in range(p.MAX_FRAME + 1) if n != p.FRAME_SIZES[cmd]])
        elif kind == "command":
            cmd = r.choice([r.randrange(7, 0x10000), r.randrange(7, 64)])
            length = r.randrange(p.MAX_FRAME + 1)
        else:  # oversize
            cmd = r.randrange(0x10000)
            length = r.choice([p.MAX_FRAME + 1, r.randrange(p.MAX_FRAME + 1, 0x10000)])
        cut = r.choice([4, 12, max(4, min(length, 64))])  # the header, always: 4 bytes decide
        return _pad(HEAD.pack(length, cmd) + r.randbytes(64), cut)

    def wrong_length(self) -> Plan:
        return Plan("wrong_length", chunks=[self._bad_header("length")],
                    expect="protocol_error", reason="length")

    def unknown_command(self) -> Plan:
        return Plan("unknown_command", chunks=[self._bad_header("command")],
                    expect="protocol_error", reason="command")

    def oversize(self) -> Plan:
        return Plan("oversize", chunks=[self._bad_header("oversize")],
                    expect="protocol_error", reason="oversize")

    def login_first(self) -> Plan:
        frame = self.rng.choice([p.Shake(0), p.Claim(0, 1), p.ShakeResult(1, 14, 1, 1),
                                 p.EnvelopePush(1, 1, (1, 2, 3)), p.LoginResult(1, 0)])
        return Plan("not_login_first", chunks=[p.encode(frame)], expect="protocol_error",
                    reason="login_first")

    def flood_before_login(self) -> Plan:
        n = self.rng.randrange(100, 3000)
        return Plan("flood_before_login", chunks=[p.encode(p.Shake(0)) * n],
                    expect="protocol_error", reason="login_first")

    def random_bytes(self) -> Plan:
        while True:
            data = self.rng.randbytes(self.rng.randrange(4, 512))
            if HEAD.unpack_from(data) != (p.FRAME_SIZES[p.Command.LOGIN], p.Command.LOGIN):
                break  # a valid LOGIN header by chance would be a login, not a bad input
        expect, reason, _ = verdict(data, logged_in=False)
        return Plan("random_bytes", chunks=[data], expect=expect, reason=reason)

    def split_bad(self) -> Plan:
        plan = self.rng.choice([self.wrong_length, self.unknown_command, self.oversize,
                                self.login_first])()
        data = plan.chunks[0]
        plan.case, plan.chunks = "split_bad_every_byte", [data[i : i + 1] for i in
                                                         range(len(data))]
        return plan

    def never_login(self) -> Plan:
        return Plan("never_login", expect="login_timeout")

    def partial_login(self) -> Plan:
        data = p.encode(p.Login(self.user()))[: self.rng.randrange(1, 16)]
        return Plan("partial_login", chunks=[data], expect="login_timeout")

    def login_zero(self) -> Plan:
        """User 0 logs in and shakes as "me" (0) and as user 0: two answers."""
        if self.zero_used:
            return self.split_valid()
        self.zero_used = True
        data = p.encode(p.Login(0)) + p.encode(p.Shake(0)) + p.encode(p.Shake(0))
        return Plan("login_userid_0", chunks=[data], answers=2, logs_in=True)

    # -- after a good LOGIN
    def after_login(self) -> Plan:
        kind = self.rng.choice(["length", "command", "oversize"])
        data = self._bad_header(kind)
        return Plan(f"{kind}_after_login", login=self.user(), chunks=[data],
                    expect="protocol_error", reason=kind)

    def direction(self) -> Plan:
        frame = self.rng.choice([p.ShakeResult(1, 14, 1, 1), p.EnvelopePush(1, 1, (1, 2, 3)),
                                 p.LoginResult(1, 0), p.ClaimResult(1, 1)])
        return Plan("direction", login=self.user(), chunks=[p.encode(frame)],
                    expect="protocol_error", reason="direction")

    def login_twice(self) -> Plan:
        return Plan("login_twice", login=self.user(), chunks=[p.encode(p.Login(self.user()))],
                    expect="protocol_error", reason="login_twice")

    def split_valid(self) -> Plan:
        user = self.user()
        data = p.encode(p.Login(user)) + p.encode(p.Shake(0)) + p.encode(p.Claim(0, 12345))
        return Plan("valid_split_every_byte", chunks=[data[i : i + 1] for i in
                                                      range(len(data))],
                    expect="served", answers=2, logs_in=True)

    def _mutated_body(self, user: int, max_frames: int, limit: int) -> bytes:
        """Valid SHAKE/CLAIM frames with a few random byte edits, cut to ``limit`` bytes."""
        r = self.rng
        frames = [r.choice([p.Shake(0), p.Shake(user), p.Shake(r.randrange(1 << 32)),
                            p.Claim(0, r.randrange(1 << 32)), p.Claim(user, 7)])
                  for _ in range(r.randrange(1, max_frames))]
        data = bytearray(b"".join(p.encode(f) for f in frames))
        for _ in range(r.choice([0, 1, 1, 2, 3, 8])):
            pos = r.randrange(len(data))
            op = r.randrange(3)
            if op == 0:
                data[pos] ^= 1 << r.randrange(8)
            elif op == 1:
                data[pos] = r.randrange(256)
            else:
                del data[pos]
                if not data:
                    data = bytearray(p.encode(p.Shake(0)))
        if r.random() < 0.2:
            cut = r.randrange(1, len(data) + 1)
            data = data[:cut]  # a partial frame at the end stays pending: still served
        return bytes(data[:limit])

    def mutated(self) -> Plan:
        user = self.user()
        data = self._mutated_body(user, 40, MAX_PAYLOAD)
        expect, reason, answers = verdict(data, logged_in=True)
        return Plan("mutated_stream", login=user, chunks=[data], expect=expect, reason=reason,
                    answers=answers)

    def login_with_payload(self) -> Plan:
        """LOGIN and up to 4 KB of (mutated) frames in one write: they ride the hand-off."""
        user = self.user()
        login = p.encode(p.Login(user))
        data = self._mutated_body(user, 260, ONE_READ - len(login))
        expect, reason, answers = verdict(data, logged_in=True)
        return Plan("login_with_payload", chunks=[login + data], expect=expect, reason=reason,
                    answers=answers, logs_in=True)

    def weighted(self) -> list[tuple[Callable[[], Plan], int]]:
        return [(self.wrong_length, 6), (self.unknown_command, 6), (self.oversize, 6),
                (self.login_first, 6), (self.flood_before_login, 3), (self.random_bytes, 10),
                (self.split_bad, 3), (self.never_login, 2), (self.partial_login, 2),
                (self.login_zero, 3), (self.after_login, 8), (self.direction, 4),
                (self.login_twice, 4), (self.split_valid, 2), (self.mutated, 20),
                (self.login_with_payload, 8)]

    def pick(self) -> Plan:
        choices, weights = zip(*self.weighted(), strict=True)
        return self.rng.choices(choices, weights)[0]()


@dataclass
class Tally:
    tried: int = 0
    closed: int = 0  # closed by the server
    served: int = 0  # kept open and fully answered; closed by us
    wrong: int = 0  # did not behave as predicted
    bytes: int = 0


class Harness:
    """Runs cases on ``connections`` greenlets for ``seconds``; tallies per case."""

    def __init__(self, host: str, port: int, seconds: float, connections: int,
                 login_wait: float, seed: int, user_base: int) -> None:
        self.address = (host, port)
        self.seconds = seconds
        self.connections = connections
        self.login_wait = login_wait
        self.cases = Cases(random.Random(seed), user_base)
        self.tallies: dict[str, Tally] = {}
        self.expected: Counter[str] = Counter()
        self.failures: list[str] = []
        self.connect_failures = 0

    def run(self) -> None:
        deadline = time.time() + self.seconds

        def loop() -> None:
            while time.time() < deadline:
                self.one(self.cases.pick())

        gevent.joinall([gevent.spawn(loop) for _ in range(self.connections)])

    def one(self, plan: Plan) -> None:
        tally = self.tallies.setdefault(plan.case, Tally())
        try:
            sock = socket.create_connection(self.address, timeout=CLOSE_WAIT)
        except OSError:
            self.connect_failures += 1
            return
        tally.tried += 1
        tally.bytes += plan.sent_bytes
        self.expected["accepted"] += 1
        try:
            outcome = self._drive(sock, plan)
        except OSError as exc:
            outcome = f"error {exc!r}"
        finally:
            sock.close()
        if outcome == "closed" and plan.expect != "served":
            tally.closed += 1
        elif outcome == "served" and plan.expect == "served":
            tally.served += 1
        else:
            tally.wrong += 1
            self.failures.append(f"{plan.case}: expected {plan.expect} {plan.reason}, got "
                                 f"{outcome}")
        if plan.expect == "protocol_error":
            self.expected["protocol_errors"] += 1
            self.expected["close.protocol_error"] += 1
            self.expected["protocol_error." + plan.reason] += 1
        elif plan.expect == "served":
            self.expected["close.peer_closed"] += 1
        else:
            self.expected["close." + plan.expect] += 1
        if plan.login or plan.logs_in:
            self.expected["logins"] += 1

    def _drive(self, sock: socket.socket, plan: Plan) -> str:
        decoder = p.Decoder()
        if plan.login:
            sock.sendall(p.encode(p.Login(plan.login)))
            frames = self._read(sock, decoder, 1, ANSWER_WAIT)
            if not frames or frames[0].command != p.Command.LOGIN_RESULT:
                return f"no LOGIN_RESULT ({frames})"
        for i, chunk in enumerate(plan.chunks):
            try:
                sock.sendall(chunk)
            except OSError:
                return "closed"  # closed while we were still writing (e.g. split at byte 4)
            if i + 1 < len(plan.chunks):
                gevent.sleep(SPLIT_PAUSE)
        if plan.expect == "served":
            want = plan.answers + (1 if plan.logs_in else 0)  # + its LOGIN_RESULT
            frames = self._read(sock, decoder, want, ANSWER_WAIT)
            if frames is None:
                return "closed"
            if len(frames) != want:
                return f"{len(frames)} answers of {want}"
            return "served"
        wait = self.login_wait if plan.expect == "login_timeout" else CLOSE_WAIT
        return "closed" if self._read(sock, decoder, 1 << 30, wait) is None else "still open"

    @staticmethod
    def _read(sock: socket.socket, decoder: p.Decoder, want: int,
              wait: float) -> list[p.Frame] | None:
        """Frames until ``want`` arrived or ``wait`` passed; None once the server closed."""
        frames: list[p.Frame] = []
        deadline = time.time() + wait
        while len(frames) < want:
            left = deadline - time.time()
            if left <= 0:
                return frames
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                return frames
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not data:
                return None
            frames.extend(decoder.feed(data))
        return frames


def get_counters(control: str) -> dict[str, int]:
    with urllib.request.urlopen(f"http://{control}/stats?seconds=0", timeout=10) as resp:
        return json.loads(resp.read())["counters"]


def settle(control: str, before: dict[str, int], expected: Counter[str],
           timeout: float = 10.0) -> dict[str, int]:
    """Counter deltas once the server has seen every close (or ``timeout`` passed)."""
    deadline = time.time() + timeout
    while True:
        after = get_counters(control)
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(expected)}
        if all(delta.get(k, 0) >= n for k, n in expected.items()) or time.time() > deadline:
            return delta
        time.sleep(0.1)


def report(harness: Harness, delta: dict[str, int] | None, elapsed: float) -> dict[str, Any]:
    rows = {name: vars(t) for name, t in sorted(harness.tallies.items())}
    total = {k: sum(r[k] for r in rows.values()) for k in ("tried", "closed", "served", "wrong",
                                                             "bytes")}
    result: dict[str, Any] = {"seconds": round(elapsed, 3), "cases": rows, "total": total,
                              "connect_failures": harness.connect_failures,
                              "failures": harness.failures[:20],
                              "expected": dict(harness.expected)}
    if delta is not None:
        keys = sorted(set(harness.expected) | {k for k in delta if k.startswith(
            ("protocol_error", "close."))} | set(COUNTERS))
        result["counters"] = {k: {"expected": harness.expected.get(k, 0),
                                  "server": delta.get(k, 0)} for k in keys}
        result["counter_mismatches"] = [k for k, v in result["counters"].items()
                                        if v["expected"] != v["server"]]
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'case':<26}{'tried':>8}{'closed':>8}{'served':>8}{'wrong':>7}{'bytes':>10}"]
    for name, r in [*result["cases"].items(), ("TOTAL", result["total"])]:
        lines.append(f"{name:<26}{r['tried']:>8}{r['closed']:>8}{r['served']:>8}"
                     f"{r['wrong']:>7}{r['bytes']:>10}")
    if "counters" in result:
        lines.append("")
        lines.append(f"{'server counter':<34}{'expected':>10}{'server':>10}")
        for name, v in result["counters"].items():
            mark = "" if v["expected"] == v["server"] else "  <-- differs"
            lines.append(f"{name:<34}{v['expected']:>10}{v['server']:>10}{mark}")
    lines.append(f"\n{result['total']['tried']} bad connections in {result['seconds']} s, "
                 f"{result['total']['wrong']} not as predicted, "
                 f"{result['connect_failures']} connect failures")
    lines += [f"  {f}" for f in result["failures"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.fuzz",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="server address (loopback)")
    parser.add_argument("--port", type=int, required=True, help="server port")
    parser.add_argument("--control", default="", help="HOST:PORT of the server's control API "
                        "(to compare its counters with what was sent)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to start cases")
    parser.add_argument("--connections", type=int, default=200, help="concurrent connections")
    parser.add_argument("--login-wait", type=float, default=13.0,
                        help="seconds to wait for a login timeout (server's + ~1 s + slack)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    parser.add_argument("--user-base", type=int, default=3_000_000_000,
                        help="logged-in cases use userids above this")
    parser.add_argument("--json", default="", help="also write the report as JSON here")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else time.time_ns() % 1_000_000
    harness = Harness(args.host, args.port, args.seconds, args.connections, args.login_wait,
                      seed, args.user_base)
    before = get_counters(args.control) if args.control else None
    started = time.time()
    harness.run()
    elapsed = time.time() - started
    delta = settle(args.control, before, harness.expected) if before is not None else None
    result = report(harness, delta, elapsed)
    result["seed"] = seed
    print(format_table(result) + f"\nseed {seed}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    ok = not result["total"]["wrong"] and not result.get("counter_mismatches")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
