"""Test helpers: a real server subprocess and a small blocking protocol client.

The server runs in its own process group and is always stopped by PID
(SIGTERM, then SIGKILL of the group), also when a test fails.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

from app import protocol as p
from app.local.runner import ROOT, SERVER_READY, Service, request_json, server_command

__all__ = ["ROOT", "Client", "ServerProcess"]


class ServerProcess:
    """``python -m app.server`` as a runner ``Service``, with the helpers tests use."""

    def __init__(self, journal_dir: Path, sets: int = 4, extra: list[str] | None = None,
                 port: int = 0) -> None:
        self.journal_dir = journal_dir
        self.sets = sets
        self.extra = extra or []
        self.port = port
        self.control_port = 0
        self.service: Service | None = None
        self.log_path = journal_dir.parent / f"server-{time.time_ns()}.log"

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.service.proc if self.service else None

    def start(self, timeout: float = 30.0) -> ServerProcess:
        cmd = server_command(self.journal_dir, self.sets, self.port,
                             f"127.0.0.1:{self.control_port}", self.extra)
        self.service = Service("server", cmd, self.log_path, SERVER_READY)
        match = self.service.start(timeout)
        self.port = int(match.group(1))
        self.control_port = int(match.group(3))
        return self

    def get(self, path: str, timeout: float = 10.0) -> dict:
        """The JSON answer; a 4xx/5xx answer carries its status as ``_status``."""
        status, body = request_json(f"127.0.0.1:{self.control_port}", path, timeout)
        if status != 200:
            body["_status"] = status
        return body

    def stats(self, audit: bool = False) -> dict:
        return self.get("/stats?audit=1" if audit else "/stats")

    def set_pids(self) -> list[int]:
        return [s["pid"] for s in self.stats()["per_set"] if s["up"]]

    def wait_healthy(self, timeout: float = 20.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                health = self.get("/health", timeout=2)
                if health.get("status") == "ok":
                    return health
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not healthy in {timeout}s: {self.get('/health')}")

    def terminate(self, timeout: float = 20.0) -> int:
        """Graceful stop (SIGTERM to the supervisor); returns its exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop(15.0)  # SIGKILL of the group: any SET left behind
        self.service = None


class Client:
    """A blocking one-user client over a real socket (for tests, not load)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = p.Decoder()
        self.frames: list = []
        self.userid = 0

    def send(self, *frames: p.Frame) -> None:
        self.sock.sendall(b"".join(p.encode(f) for f in frames))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float = 5.0) -> p.Frame:
        self.sock.settimeout(timeout)
        while not self.frames:
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("closed by server")
            self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    def recv_type(self, kind: type, timeout: float = 5.0) -> p.Frame:
        """The next frame of ``kind``; frames of other kinds before it are kept aside."""
        aside = []
        try:
            while True:
                frame = self.recv(timeout)
                if isinstance(frame, kind):
                    return frame
                aside.append(frame)
        finally:
            self.frames[:0] = aside

    def login(self, userid: int) -> p.LoginResult:
        self.userid = userid
        self.send(p.Login(userid, int(time.time())))
        return self.recv_type(p.LoginResult)

    def shake(self, userid: int = 0) -> p.ShakeResult:
        self.send(p.Shake(userid, int(time.time())))
        return self.recv_type(p.ShakeResult)

    def claim(self, envelope_id: int, userid: int = 0) -> p.ClaimResult:
        self.send(p.Claim(userid, envelope_id, int(time.time())))
        return self.recv_type(p.ClaimResult)

    def is_closed(self, timeout: float = 3.0) -> bool:
        """True once the server has closed this connection (EOF or reset)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(4096)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()
