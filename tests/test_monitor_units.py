"""monitor.stack's pieces that need no daemon: configs, ports, pid safety, the bench packer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from monitor import bench, procs, stack
from monitor.stack import Ports, Stack, StackError


def test_configs_render_every_placeholder_and_bind_loopback_only(tmp_path):
    st = Stack(root=tmp_path, ports=Ports.free(), retentions="1s:30m")
    st.write_configs()
    conf = tmp_path / "conf"
    carbon = (conf / "carbon.conf").read_text()
    assert f"LINE_RECEIVER_PORT = {st.ports.carbon_line_port}" in carbon
    assert "MAX_CREATES_PER_MINUTE = inf" in carbon
    interfaces = [line.split("=")[1].strip() for line in carbon.splitlines()
                  if "_INTERFACE" in line and not line.startswith("#")]
    assert interfaces and set(interfaces) == {"127.0.0.1"}
    statsd = (conf / "statsd.js").read_text()
    assert f"port: {st.ports.statsd_port}" in statsd and "0.0.0.0" not in statsd
    assert "retentions = 1s:30m" in (conf / "storage-schemas.conf").read_text()
    settings = (conf / "hongbao_graphite_settings.py").read_text()
    assert f'"127.0.0.1:{st.ports.carbon_query_port}:a"' in settings
    for path in conf.iterdir():
        assert "{{" not in path.read_text(), path
    # A second render keeps the secret key (sessions survive a restart).
    st.write_configs()
    assert (conf / "hongbao_graphite_settings.py").read_text() == settings


def test_unknown_placeholder_is_an_error():
    with pytest.raises(StackError):
        stack._render("a {{missing}} b", {})


def test_ports_from_env_and_busy(monkeypatch):
    monkeypatch.setenv("HONGBAO_MONITOR_WEB_PORT", "18181")
    assert Ports.from_env().web_port == 18181
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        ports = Ports.free()
        ports.web_port = s.getsockname()[1]
        assert ports.busy() == [f"web_port={ports.web_port}"]


def test_down_never_signals_a_pid_that_is_not_this_stacks(tmp_path):
    """A stale stack.json whose pid now belongs to another program: left alone."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             start_new_session=True)
    try:
        st = Stack(root=tmp_path, ports=Ports.free())
        st.pids = {"carbon": other.pid}
        st.save_state()
        recorded = st.load_state()
        assert recorded is not None and not recorded.alive()
        assert recorded.down() == []
        time.sleep(0.1)
        assert other.poll() is None
        assert not st.state_file.exists()
    finally:
        other.kill()
        other.wait()


def test_down_stops_the_whole_group_of_a_recorded_daemon(tmp_path):
    """A daemon from stack.json whose command line names the root: its group is stopped."""
    script = ("import subprocess, sys, time; "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              "time.sleep(60)")
    leader = subprocess.Popen([sys.executable, "-c", script,
                               f"--config={tmp_path / 'conf' / 'carbon.conf'}"],
                              start_new_session=True)
    try:
        time.sleep(0.5)
        st = Stack(root=tmp_path, ports=Ports.free(), pids={"statsd": leader.pid})
        st.save_state()
        recorded = st.load_state()
        assert recorded.alive()
        # A stack whose root is a prefix of ours does not claim it.
        assert not procs.is_ours(leader.pid, tmp_path.parent / tmp_path.name[:-1])
        assert recorded.down() == ["statsd"]
        leader.wait(5)
        with pytest.raises(ProcessLookupError):
            os.killpg(leader.pid, 0)
    finally:
        if leader.poll() is None:
            leader.kill()
            leader.wait()


def test_status_json_state_round_trip(tmp_path):
    st = Stack(root=tmp_path, ports=Ports.free(), retentions="1s:1h", pids={"web": 1})
    st.save_state()
    state = json.loads(st.state_file.read_text())
    assert state["statsd"] == st.statsd_address and state["graphite"] == st.graphite_url
    again = st.load_state()
    assert again.ports == st.ports and again.retentions == "1s:1h"


def test_bench_packs_lines_into_statsd_sized_datagrams():
    lines = [f"hongbao.bench.c{i}:1|c" for i in range(1000)]
    packed = bench.datagrams(lines)
    assert all(len(d) <= bench.DATAGRAM for d in packed)
    assert b"\n".join(packed).decode().split("\n") == lines


def test_statsd_bind_is_loopback_unless_told_and_must_be_an_address(tmp_path):
    st = Stack(root=tmp_path, ports=Ports.free())
    st.write_configs()
    assert 'address: "127.0.0.1"' in (tmp_path / "conf" / "statsd.js").read_text()
    wide = Stack(root=tmp_path, ports=st.ports, statsd_bind="0.0.0.0")
    wide.write_configs()
    statsd = (tmp_path / "conf" / "statsd.js").read_text()
    assert 'address: "0.0.0.0"' in statsd and 'mgmt_address: "127.0.0.1"' in statsd
    assert wide.statsd_address == f"127.0.0.1:{st.ports.statsd_port}"
    carbon = (tmp_path / "conf" / "carbon.conf").read_text()
    assert "0.0.0.0" not in carbon
    with pytest.raises(StackError):
        Stack(root=tmp_path, statsd_bind='1.2.3.4", x: "').write_configs()


def test_a_cpu_total_read_every_other_second_is_drawn_as_an_even_rate():
    """At one million connections the bench reads CPU every ~2 s: a repeated reading
    must not draw as a zero followed by a double."""
    from monitor.report import spread_readings

    readings = [(1, 10.0), (2, 10.0), (3, 12.0), (4, 13.0), (5, 13.0), (6, 13.0), (7, 16.0)]
    assert spread_readings(readings) == [(2, 1.0), (3, 1.0), (4, 1.0), (5, 1.0), (6, 1.0),
                                         (7, 1.0)]
    assert spread_readings([(1, 5.0)]) == []
