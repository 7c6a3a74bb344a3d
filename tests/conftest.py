"""Shared fixtures: a real server on loopback, stopped by PID even when a test fails.

A test that uses a fixture starting processes is marked ``processes``, so the
fast tier (``make check``) can leave it out with ``-m "not processes"``.
"""

from __future__ import annotations

import pytest

from tests.serverproc import Client, ServerProcess

PROCESS_FIXTURES = {"start_server", "server", "clients", "start_agent", "agents", "guarded"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.processes)



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
