"""A bare load generator for benchmarks: N logged-in connections, Q shakes/s in ticks.

It exists so a benchmark can load one server (ours or the baseline) from a
separate process with the same client cost for both; the real client agent
(``app.client``) adds scheduling across a fleet, reconnects and stats.

Protocol with the parent over stdin/stdout: prints ``ready <connections>``
once every user is logged in, waits for a line on stdin, runs the load for
``--seconds`` and prints one JSON line of results.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import gevent

from app import protocol as p
from app.reactor import READ, Reactor, read_some, write_some

TICKS = 100


class LoadGen:
    def __init__(self, host: str, port: int, connections: int, first_user: int = 1,
                 source: str = "") -> None:
        self.host, self.port = host, port
        self.n = connections
        self.first_user = first_user
        self.source = source
        self.fds: list[int] = []
        self.sessions: dict[int, p.ClientSession] = {}
        self.sent_at: dict[int, list[float]] = {}
        self.answered = 0
        self.logged_in = 0
        self.sent = 0
        self.latencies: list[float] = []
        self.reactor = Reactor(self._dispatch)

    def connect(self) -> None:
        for i in range(self.n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.source:
                sock.setsockopt(socket.SOL_IP, 24, 1)  # IP_BIND_ADDRESS_NO_PORT
                sock.bind((self.source, 0))
            sock.connect((self.host, self.port))
            sock.setblocking(False)
            fd = sock.detach()
            self.fds.append(fd)
            session = self.sessions[fd] = p.ClientSession(self.first_user + i)
            self.sent_at[fd] = []
            self.reactor.register(fd, READ)
            os.write(fd, session.login(int(time.time())))
        self.reactor.start()
        deadline = time.time() + 60
        while self.logged_in < self.n and time.time() < deadline:
            gevent.sleep(0.05)

    def _dispatch(self, events: list[tuple[int, int]]) -> None:
        now = time.perf_counter()
        for fd, _mask in events:
            data = read_some(fd, 65536)
            if not data:
                continue
            pending = self.sent_at[fd]
            for frame in self.sessions[fd].receive(data):
                if type(frame) is p.ShakeResult:
                    self.answered += 1
                    if pending:
                        self.latencies.append(now - pending.pop(0))
                elif type(frame) is p.LoginResult:
                    self.logged_in += 1

    def run(self, qps: int, seconds: float) -> dict:
        start = time.time()
        end = start + seconds
        cursor = 0
        tick = int(start * TICKS) + 1
        answered_before = self.answered
        while True:
            gevent.sleep(max(0.0, tick / TICKS - time.time()))
            if tick / TICKS >= end:
                break
            index = tick % TICKS
            n = qps * (index + 1) // TICKS - qps * index // TICKS
            second = int(time.time())
            stamp = time.perf_counter()
            for _ in range(n):
                fd = self.fds[cursor]
                cursor = (cursor + 1) % len(self.fds)
                if write_some(fd, self.sessions[fd].shake(second)) == b"":
                    self.sent_at[fd].append(stamp)
                    self.sent += 1
            tick += 1
        gevent.sleep(1.0)  # answers in flight
        lat = sorted(self.latencies)

        def pct(q: float) -> float:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 3) if lat else 0.0

        return {"sent": self.sent, "answered": self.answered - answered_before,
                "seconds": seconds, "p50_ms": pct(0.50), "p99_ms": pct(0.99),
                "p999_ms": pct(0.999)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--first-user", type=int, default=1)
    parser.add_argument("--source", default="")
    parser.add_argument("--qps", type=int, default=10000)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    gen = LoadGen(args.host, args.port, args.connections, args.first_user, args.source)
    gen.connect()
    print(f"ready {gen.logged_in}", flush=True)
    if not sys.stdin.readline():
        return 0
    print(json.dumps(gen.run(args.qps, args.seconds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
