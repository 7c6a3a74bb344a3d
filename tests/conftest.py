"""Shared fixtures: a real server on loopback, stopped by PID even when a test fails."""

from __future__ import annotations

import pytest

from tests.serverproc import Client, ServerProcess


@pytest.fixture
def start_server(tmp_path):
    """Factory: ``start_server(sets=4, extra=[...])`` -> a running ServerProcess."""
    started: list[ServerProcess] = []

    def start(sets: int = 4, extra: list[str] | None = None, journal: str = "journal",
              port: int = 0) -> ServerProcess:
        server = ServerProcess(tmp_path / journal, sets=sets, extra=extra, port=port)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(start_server):
    return start_server()


@pytest.fixture
def clients():
    """Factory of logged-in test clients, all closed at the end."""
    made: list[Client] = []

    def connect(port: int, userid: int | None = None) -> Client:
        client = Client(port)
        made.append(client)
        if userid is not None:
            result = client.login(userid)
            assert result.result == 0, result
        return client

    yield connect
    for client in made:
        client.close()
