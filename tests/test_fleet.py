"""The fleet playbooks, for real: local Debian test hosts, Ansible over ssh.

One module-scoped fleet of 3 hosts (h1 = server, h2/h3 = clients) built by
:mod:`fleet.local` in its own namespaces and subnet (so a developer's own
``python -m fleet.local up`` fleet is left alone), torn down by the fixture
even when a test fails.  The tests run in file order: ``--check --diff``
on the new hosts, deploy (twice: the second must change nothing),
``--check --diff`` again (nothing to change), then a whole run —
start, ramp-qps (the server's per-second rate must match), status, stop —
and finally the same over paramiko.

Needs root, debootstrap (the root filesystem is cached after the first
build, ~70 s), ansible-core from requirements-fleet.txt.  Without them the
tests skip, unless HONGBAO_FLEET_REQUIRED=1 (set by .ci/run) makes that a
failure.  Run alone with::

    .venv/bin/python -m pytest -m fleet -v
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from fleet.local.__main__ import run_playbook
from fleet.local.hosts import REPO_ROOT, Fleet

pytestmark = [pytest.mark.fleet, pytest.mark.timeout(1200)]

LOCAL_GROUP_VARS = REPO_ROOT / "fleet" / "inventory" / "local" / "group_vars"
FIGURES = REPO_ROOT / "var" / "fleet" / "test-figures.json"
RECAP = re.compile(
    r"^(\S+)\s*: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M
)
CONNECTIONS_PER_CLIENT = 50  # fleet/inventory/local/group_vars/all.yml
TOLERANCE = 0.05
LOCK_DIR = "/run/lock" if os.path.isdir("/run/lock") else "/tmp"


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (namespaces, mounts, links)"
    for tool in ("debootstrap", "nsenter", "unshare", "ip", "ssh", "ssh-keygen", "pivot_root"):
        if not shutil.which(tool):
            return f"needs {tool}"
    try:
        import ansible  # noqa: F401
        import paramiko  # noqa: F401
    except ImportError as exc:
        return f"needs requirements-fleet.txt ({exc})"
    return None


@contextlib.contextmanager
def _slot():
    """An exclusive slot number: names and subnets derived from it are this run's
    alone (several test runs on one machine must never tear down each other's
    hosts: ``up`` first removes whatever carries its name)."""
    for slot in range(10):
        lock = open(f"{LOCK_DIR}/hongbao-fleet-test-{slot}.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        try:
            yield slot
        finally:
            lock.close()
        return
    pytest.skip("10 fleet test runs already in progress on this machine")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    reason = _missing()
    if reason:
        if os.environ.get("HONGBAO_FLEET_REQUIRED") == "1":
            pytest.fail(f"fleet tests required but cannot run: {reason}")
        pytest.skip(reason)
    with _slot() as slot:
        yield from _fleet(tmp_path_factory, f"hbt{slot}", f"10.213.{20 + slot}.0/24")


def _fleet(tmp_path_factory, name: str, subnet: str):
    state = tmp_path_factory.mktemp("fleet")
    inventory = state / "inventory"
    inventory.mkdir()
    (inventory / "group_vars").symlink_to(LOCAL_GROUP_VARS)
    # Ship a snapshot of the code: edits in the working tree during the run
    # must not make the second deploy "change" something.
    source = state / "src"
    source.mkdir()
    for top in ("requirements.txt", "pyproject.toml"):
        shutil.copy2(REPO_ROOT / top, source / top)
    for package in ("app", "monitor"):
        shutil.copytree(REPO_ROOT / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "node_modules"))
    test_fleet = Fleet(name=name, subnet=subnet, state_dir=state,
                       inventory=inventory / "hosts.yml")
    try:
        started = time.monotonic()
        test_fleet.up(clients=2, monitors=0)
        test_fleet.figures = {"up_seconds": round(time.monotonic() - started, 1)}
        test_fleet.source = source
        yield test_fleet
    finally:
        test_fleet.down()
        leftovers = _leftovers(test_fleet)
        figures = getattr(test_fleet, "figures", None)
        if figures:
            FIGURES.parent.mkdir(parents=True, exist_ok=True)
            FIGURES.write_text(json.dumps(figures, indent=2))
        assert not leftovers, f"down left {leftovers}"


def _leftovers(f: Fleet) -> list[str]:
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [line.split()[0] for line in netns.splitlines() if line.startswith(f"{f.name}-")]
    links = json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True,
                                      text=True).stdout or "[]")
    found += [lk["ifname"] for lk in links if lk["ifname"].startswith(f.bridge)]
    with open("/proc/self/mountinfo") as mounts:
        found += [line.split()[4] for line in mounts if str(f.state_dir) in line]
    if (f.state_dir / "hosts").exists():
        found.append(str(f.state_dir / "hosts"))
    return found


def play(f: Fleet, playbook: str, *args: str, name: str | None = None) -> dict:
    """Run a playbook against the test fleet; fail with its output's tail if it fails."""
    extra = ["-e", f"app_source_dir={f.source}",
             "-e", f"app_bundle_dir={f.state_dir / 'bundle'}", *args]
    started = time.monotonic()
    result = run_playbook(playbook, extra, state_dir=f.state_dir, inventory=f.inventory,
                          capture=True)
    seconds = round(time.monotonic() - started, 1)
    output = result.stdout + result.stderr
    (f.state_dir / f"{name or playbook}.log").write_text(output)
    recap = {m[0]: {"ok": int(m[1]), "changed": int(m[2]), "unreachable": int(m[3]),
                    "failed": int(m[4])} for m in RECAP.findall(output)}
    f.figures[name or playbook] = {
        "seconds": seconds,
        "changed": sum(r["changed"] for r in recap.values()),
        "command": " ".join(["ansible-playbook", playbook, *args]),
    }
    assert result.returncode == 0, f"{playbook} {args} failed:\n{output[-6000:]}"
    assert recap and all(r["failed"] == 0 and r["unreachable"] == 0 for r in recap.values())
    return {"recap": recap, "output": output}


def test_check_diff_on_new_hosts(fleet):
    """--check --diff before anything is deployed: runs through, reports what it would do."""
    checked = play(fleet, "deploy.yml", "--check", "--diff", name="deploy-check-new")
    assert all(r["changed"] > 0 for r in checked["recap"].values())


def test_deploy_then_second_deploy_changes_nothing(fleet):
    first = play(fleet, "deploy.yml", name="deploy-1")
    assert set(first["recap"]) == {h.name for h in fleet.hosts}
    assert sum(r["changed"] for r in first["recap"].values()) > 0
    second = play(fleet, "deploy.yml", name="deploy-2")
    changed = {host: r["changed"] for host, r in second["recap"].items()}
    assert changed == {h.name: 0 for h in fleet.hosts}, second["output"][-4000:]


def test_check_diff_after_deploy_changes_nothing(fleet):
    checked = play(fleet, "deploy.yml", "--check", "--diff", name="deploy-check")
    assert all(r["changed"] == 0 for r in checked["recap"].values())


def _ramp(fleet, qps: int) -> dict:
    report = fleet.state_dir / f"ramp-{qps}.json"
    play(fleet, "ramp-qps.yml", "-e", f"qps={qps}", "-e", f"ramp_report={report}",
         name=f"ramp-{qps}")
    figures = json.loads(report.read_text())
    rates = figures["served"]
    fleet.figures[f"ramp-{qps}"]["server_per_second"] = rates
    fleet.figures[f"ramp-{qps}"]["client_shares"] = figures["clients"]
    return {"rates": rates, "shares": figures["clients"]}


def _status(fleet) -> dict:
    report = fleet.state_dir / "status.json"
    play(fleet, "status.yml", "-e", f"status_report={report}", name="status")
    return {row["host"]: row for row in json.loads(report.read_text())}


def test_start_ramp_status_stop(fleet):
    play(fleet, "start.yml", name="start")
    expected = 2 * CONNECTIONS_PER_CLIENT

    for qps in (300, 601):
        ramp = _ramp(fleet, qps)
        assert sum(ramp["shares"]) == qps and max(ramp["shares"]) - min(ramp["shares"]) <= 1
        assert len(ramp["rates"]) >= 5
        for rate in ramp["rates"]:
            assert abs(rate - qps) <= qps * TOLERANCE, f"server saw {ramp['rates']} for {qps}"

    server, clients = fleet.hosts[0].name, [h.name for h in fleet.hosts[1:]]
    status = _status(fleet)
    fleet.figures["status"]["established"] = {h: r["established"] for h, r in status.items()}
    assert int(status[server]["established"]) == expected
    assert int(status[server]["connections"]) == expected
    for client in clients:
        assert int(status[client]["established"]) == CONNECTIONS_PER_CLIENT
        assert status[client]["service_up"]

    collected = fleet.state_dir / "collect"
    play(fleet, "collect.yml", "-e", f"collect_dir={collected}", name="collect")
    server_stats = json.loads((collected / server / "stats.json").read_text())
    assert server_stats["connections"] == expected and server_stats["ledger"]["balanced"]
    assert (collected / server / "hongbao-server.log").stat().st_size > 0
    assert (collected / clients[0] / "hongbao-client.log").stat().st_size > 0

    # start.yml again: everything already runs, nothing changes.
    again = play(fleet, "start.yml", name="start-again")
    assert all(r["changed"] == 0 for r in again["recap"].values())

    play(fleet, "stop.yml", name="stop")
    after = _status(fleet)
    for host, row in after.items():
        assert not row["service_up"], host
        assert int(row["established"]) == 0, host
    for host in fleet.hosts:
        for port in (1025, 8989, 9090):
            with socket.socket() as sock:
                sock.settimeout(1)
                assert sock.connect_ex((host.address, port)) != 0, (host.name, port)


def test_paramiko_connection(fleet):
    """The same inventory over paramiko: an idempotent slice of deploy, and status."""
    result = play(fleet, "deploy.yml", "-e", "ansible_connection=paramiko",
                  "--tags", "limits,sysctl,ntp", name="deploy-paramiko")
    assert all(r["changed"] == 0 for r in result["recap"].values())
    status = play(fleet, "status.yml", "-e", "ansible_connection=paramiko", "-vvv",
                  name="status-paramiko")
    assert "ESTABLISH PARAMIKO SSH CONNECTION" in status["output"]


def test_down_cleans_up_after_a_lost_state_file(tmp_path):
    """A crashed run loses its state file: down still finds everything by name."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    with _slot() as slot:
        _crash_and_clean(tmp_path, f"hbx{slot}", f"10.213.{40 + slot}.0/24")


def _crash_and_clean(tmp_path, name: str, subnet: str) -> None:
    crashed = Fleet(name=name, subnet=subnet, state_dir=tmp_path / "state",
                    inventory=tmp_path / "inv" / "hosts.yml")
    try:
        crashed.up(clients=1, monitors=0)
        pids = [h.pid for h in crashed.hosts]
        crashed.state_file.unlink()
        Fleet(name=name, subnet=subnet, state_dir=tmp_path / "state",
              inventory=tmp_path / "inv" / "hosts.yml").down()
        assert _leftovers(crashed) == []
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    finally:
        crashed.down()
