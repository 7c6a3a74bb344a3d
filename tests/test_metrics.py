"""app.metrics.statsd and app.metrics.system against a plain UDP socket on port 0 (no daemon)."""

from __future__ import annotations

import gc
import socket
import time

import gevent
import pytest

from app.metrics import system as sysmetrics
from app.metrics.statsd import FLUSH_PHASE, Metrics, _next_phase


@pytest.fixture
def udp():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2)
    yield sock
    sock.close()


def receive_lines(sock: socket.socket) -> list[str]:
    lines: list[str] = []
    sock.settimeout(0.5)
    try:
        while True:
            lines += sock.recv(65536).decode().splitlines()
    except TimeoutError:
        return lines


def test_flush_sends_summed_counters_and_gauges_in_batches(udp):
    m = Metrics("hongbao.server", f"127.0.0.1:{udp.getsockname()[1]}")
    assert m.enabled
    for _ in range(1000):
        m.incr("shakes.14")
    m.incr("amount.granted", 250)
    m.gauge("set.0.connections", 42)
    for i in range(100):  # enough lines for several datagrams
        m.incr(f"many.n{i}", i + 1)
    m.flush()
    lines = receive_lines(udp)
    assert "hongbao.server.shakes.14:1000|c" in lines
    assert "hongbao.server.amount.granted:250|c" in lines
    assert "hongbao.server.set.0.connections:42|g" in lines
    assert sum(1 for line in lines if line.startswith("hongbao.server.many.")) == 100
    m.flush()  # nothing new: counters are not repeated, gauges are
    again = receive_lines(udp)
    assert not any("shakes.14" in line for line in again)
    assert "hongbao.server.set.0.connections:42|g" in again


def test_negative_gauge_is_sent_as_an_absolute_value(udp):
    m = Metrics("hongbao.client.h1", f"127.0.0.1:{udp.getsockname()[1]}")
    m.gauge("p0.clock_offset_ms", -3.5)
    m.flush()
    lines = receive_lines(udp)
    # statsd reads "-3.5|g" as a delta: the package sends 0 first.
    assert lines[-2:] == ["hongbao.client.h1.p0.clock_offset_ms:0|g",
                          "hongbao.client.h1.p0.clock_offset_ms:-3.5|g"]


def test_sending_never_raises_when_nobody_listens():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: ICMP port unreachable on send
    m = Metrics("hongbao.server", f"127.0.0.1:{port}")
    for _ in range(5):
        m.incr("logins")
        m.flush()
    assert not m.counters


def test_disabled_without_address_or_with_unresolvable_host():
    assert not Metrics("hongbao.server", None).enabled
    m = Metrics("hongbao.server", "no-such-host.invalid:8125")
    assert not m.enabled
    m.incr("logins")
    m.start()
    m.stop()
    assert not m.counters


def test_next_flush_is_the_half_second_strictly_after_now():
    assert _next_phase(100.0) == 100.0 + FLUSH_PHASE
    assert _next_phase(100.4999) == 100.5
    assert _next_phase(100.5) == 101.5
    assert _next_phase(100.9) == 101.5


def test_flusher_flushes_once_a_second_at_the_half_second(udp):
    m = Metrics("hongbao.test", f"127.0.0.1:{udp.getsockname()[1]}")
    m.start()
    arrivals = []
    deadline = time.time() + 2.6
    while time.time() < deadline:
        m.incr("ticks")
        gevent.sleep(0.05)
        udp.setblocking(False)
        try:
            udp.recv(65536)
            arrivals.append(time.time())
        except BlockingIOError:
            pass
    m.stop()
    assert len(arrivals) >= 2
    for t in arrivals:
        assert abs((t % 1.0) - FLUSH_PHASE) < 0.1, arrivals


def test_collectors_run_before_each_flush_and_failures_are_contained(udp):
    m = Metrics("hongbao.test", f"127.0.0.1:{udp.getsockname()[1]}")
    calls = []

    def broken(metrics: Metrics) -> None:
        raise RuntimeError("collector bug")

    m.add_collector(broken)
    m.add_collector(lambda metrics: (calls.append(1), metrics.gauge("x", len(calls))))
    m.flush()
    m.flush()
    assert calls == [1, 1]
    assert "hongbao.test.x:2|g" in receive_lines(udp)


def test_gc_pause_is_measured_and_reset():
    m = Metrics("hongbao.server", None)
    watch = sysmetrics.start(m, "set.0.", loop=False)
    try:
        junk = [[i] for i in range(300_000)]
        gc.collect()
        m.flush()
        first = m.gauges["set.0.gc_pause_ms"]
        del junk
        m.flush()
        assert first > 0.1  # a full collection of 300k containers takes milliseconds
        assert m.gauges["set.0.gc_pause_ms"] < first
    finally:
        watch.stop()
    assert watch.gc not in gc.callbacks


def test_a_gc_pause_keeps_the_collectors_own_cpu_apart_from_the_wall_time():
    """On a busy box a collection can wait for a CPU; its wall time is the pause the
    loop saw, its CPU time what the collector cost."""
    pauses = sysmetrics.GCPauses()
    pauses("start", {})
    time.sleep(0.05)  # descheduled: wall time, no CPU
    pauses("stop", {})
    wall = pauses.take()
    assert wall >= 50 and pauses.last_cpu_ms < 10
    gc.callbacks.append(pauses)
    try:
        junk = [[i] for i in range(300_000)]
        gc.collect()
        del junk
    finally:
        gc.callbacks.remove(pauses)
    wall = pauses.take()
    assert 0 < pauses.last_cpu_ms <= wall + 1  # a full collection of 300k containers
    pauses.take()
    assert pauses.last_cpu_ms == 0.0  # reset with the window


def test_the_server_merges_each_seconds_worst_loop_lag_and_gc_of_any_set():
    from app.server.main import merge_health

    merged = merge_health([{"7": (1.0, 2.0, 0.5), "8": (4.0, 0.0, 0.0)},
                           {"7": (3.0, 1.0, 0.75)}])
    assert merged == [{"second": 7, "loop_lag_ms": 3.0, "gc_pause_ms": 2.0, "gc_cpu_ms": 0.75},
                      {"second": 8, "loop_lag_ms": 4.0, "gc_pause_ms": 0.0, "gc_cpu_ms": 0.0}]


def test_loop_lag_sees_a_greenlet_that_does_not_yield():
    m = Metrics("hongbao.client.h1", None)
    watch = sysmetrics.start(m, "p0.", gc=False)
    try:
        gevent.sleep(0.15)
        m.flush()
        assert m.gauges["p0.loop_lag_ms"] < 50
        time.sleep(0.3)  # blocks the hub: the probe wakes ~200 ms late
        gevent.sleep(0.15)
        m.flush()
        assert m.gauges["p0.loop_lag_ms"] > 150
    finally:
        watch.stop()


def test_net_rates_count_loopback_packets():
    m = Metrics("hongbao.net.h1", None)
    watch = sysmetrics.start(m, gc=False, loop=False, net=True, interfaces=["lo"])
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            rx.bind(("127.0.0.1", 0))
            t0 = time.monotonic()
            for _ in range(2000):
                tx.sendto(b"x" * 100, rx.getsockname())
            time.sleep(0.2)
            m.flush()
            elapsed = time.monotonic() - t0
        pps = m.gauges["lo.packets_in"]
        assert pps >= 2000 / elapsed * 0.9
        assert m.gauges["lo.bytes_out"] >= 2000 * 100 / elapsed * 0.9
        assert set(m.gauges) == {"lo.packets_in", "lo.packets_out", "lo.bytes_in",
                                 "lo.bytes_out"}
    finally:
        watch.stop()


def test_interface_names_become_one_path_component():
    assert sysmetrics.sanitize("eth0.100") == "eth0_100"
    assert sysmetrics.sanitize("hbf0-h1") == "hbf0-h1"
