"""The classic experiment on the production shape, for real: 19 local Debian
test hosts (h1 server, h2-h18 clients, h19 monitor), Ansible over ssh.

One module-scoped fleet built by :mod:`fleet.local` in its own namespaces
and subnet (a developer's own ``python -m fleet.local up`` fleet is left
alone), torn down by the fixture even when a test fails, which then asserts
nothing is left.  The tests run in file order: ``--check --diff`` on the new
hosts; the experiment of ``make fleet-experiment`` (:mod:`fleet.experiment`)
at a reduced size -- 17 x 1,000 connections, ramps of 2,000 and 4,000
shakes/s, group envelopes on -- left running; ``--check --diff`` again
(nothing to change); a server slower than the asked rate (a SET stopped with
SIGSTOP) failing ``ramp-qps`` with the figures; a slice over paramiko; stop.

Needs root, debootstrap (the root filesystem is cached after the first
build, ~80 s), ansible-core from requirements-fleet.txt, npm on the
controller (the monitor host's statsd tree).  Without them the tests skip,
unless HONGBAO_FLEET_REQUIRED=1 (set by .ci/run) makes that a failure.  Run
alone with::

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

from fleet.experiment import Experiment, Plan, snapshot_source
from fleet.local.__main__ import run_playbook
from fleet.local.hosts import REPO_ROOT, Fleet

pytestmark = [pytest.mark.fleet, pytest.mark.timeout(1200)]

LOCAL_GROUP_VARS = REPO_ROOT / "fleet" / "inventory" / "local" / "group_vars"
FIGURES = REPO_ROOT / "var" / "fleet" / "test-figures.json"
RECAP = re.compile(
    r"^(\S+)\s*: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M
)
CLIENTS = 17
CONNECTIONS_PER_CLIENT = 1000
RATES = (2000, 4000)
TOLERANCE = 0.05  # fleet/inventory/local/group_vars/all.yml ramp_tolerance
LOCK_DIR = "/run/lock" if os.path.isdir("/run/lock") else "/tmp"


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (namespaces, mounts, links)"
    for tool in ("debootstrap", "nsenter", "unshare", "ip", "ssh", "ssh-keygen", "pivot_root",
                 "npm"):
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
    source = snapshot_source(state / "src")
    test_fleet = Fleet(name=name, subnet=subnet, state_dir=state,
                       inventory=inventory / "hosts.yml")
    try:
        started = time.monotonic()
        test_fleet.up(clients=CLIENTS, monitors=1)
        test_fleet.figures = {"up_seconds": round(time.monotonic() - started, 1)}
        test_fleet.source = source
        # Two windows per rate: the machine is shared, a neighbour's burst can
        # starve one (each attempt is in the figures).
        plan = Plan(connections=CONNECTIONS_PER_CLIENT, rates=list(RATES), hold=10,
                    verify_seconds=5, tolerance=TOLERANCE, ramp_attempts=2)
        test_fleet.experiment = Experiment(
            inventory / "hosts.yml", state / "run", plan, state_dir=state,
            extra=_snapshot_vars(test_fleet))
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


def _snapshot_vars(f: Fleet) -> list[str]:
    return ["-e", f"app_source_dir={f.source}", "-e", f"app_bundle_dir={f.state_dir / 'bundle'}"]


def play(f: Fleet, playbook: str, *args: str, name: str | None = None,
         fails: bool = False) -> dict:
    """Run a playbook against the test fleet (with the experiment's size); fail with its
    output's tail if it fails (``fails``: if it does not)."""
    extra = [*_snapshot_vars(f), *f.experiment.size_vars(), *args]
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
    if fails:
        assert result.returncode != 0, f"{playbook} {args} passed:\n{output[-6000:]}"
    else:
        assert result.returncode == 0, f"{playbook} {args} failed:\n{output[-6000:]}"
        assert recap and all(r["failed"] == 0 and r["unreachable"] == 0
                             for r in recap.values())
    return {"recap": recap, "output": output}


def test_check_diff_on_new_hosts(fleet):
    """--check --diff before anything is deployed: runs through, reports what it would do."""
    checked = play(fleet, "deploy.yml", "--check", "--diff", name="deploy-check-new")
    assert set(checked["recap"]) == {h.name for h in fleet.hosts}
    assert all(r["changed"] > 0 for r in checked["recap"].values())


def test_stop_on_hosts_never_deployed_stops_nothing_and_passes(fleet):
    """A user who runs stop.yml first (or against fresh hosts) gets a clean pass."""
    stopped = play(fleet, "stop.yml", name="stop-new")
    assert set(stopped["recap"]) == {h.name for h in fleet.hosts[:1 + CLIENTS]}
    assert all(r["changed"] == 0 for r in stopped["recap"].values())
    assert "Stop hongbao-client" in stopped["output"] and "skipping" in stopped["output"]


def _step(summary: dict, name: str) -> dict:
    """The step of that name (a ramp's last attempt)."""
    steps = [s for s in summary["steps"]
             if s["name"] == name or s["name"].startswith(f"{name} (attempt ")]
    assert steps and (len(steps) == 1 or name.startswith("ramp-qps")), \
        [s["name"] for s in summary["steps"]]
    return steps[-1]


def test_experiment_on_the_production_shape(fleet):
    """make fleet-experiment at a reduced size: every step and every figure."""
    started = time.monotonic()
    summary = fleet.experiment.run(stop=False)
    fleet.figures["experiment"] = {
        "seconds": round(time.monotonic() - started, 1),
        "steps": {s["name"]: {"seconds": s["seconds"], "result": s["result"]}
                  for s in summary["steps"]}}
    assert all(s["ok"] for s in summary["steps"]), summary["steps"]
    server = fleet.hosts[0].name
    clients = {h.name for h in fleet.hosts[1:1 + CLIENTS]}
    monitor = fleet.hosts[-1].name
    assert summary["hosts"] == {"server": [server], "clients": sorted(clients),
                                "monitor": [monitor]}

    # Every host deployed; the second deploy changed nothing on any of the 19.
    deploy = _step(summary, "deploy")["figures"]
    assert deploy["hosts"] == 19 and deploy["changed"] > 0
    again = _step(summary, "deploy again")["figures"]
    assert again["hosts"] == 19 and again["changed"] == 0

    # The ntp role verified every client's offset (and the monitor's) within the limit.
    offsets = _step(summary, "ntp")["figures"]["offsets_ms"]
    assert set(offsets) == clients | {monitor}
    assert all(abs(v) <= 5.0 for v in offsets.values()), offsets

    # Every connection established: the kernel's count = the service's = expected.
    rows = {r["host"]: r for r in _step(summary, "status")["figures"]["hosts"]}
    assert int(rows[server]["established"]) == CLIENTS * CONNECTIONS_PER_CLIENT
    assert int(rows[server]["connections"]) == CLIENTS * CONNECTIONS_PER_CLIENT
    for client in clients:
        assert int(rows[client]["established"]) == CONNECTIONS_PER_CLIENT, rows[client]
        assert int(rows[client]["connections"]) == CONNECTIONS_PER_CLIENT, rows[client]
    assert rows[monitor]["service_up"] and int(rows[monitor]["received_last_minute"]) > 0

    # Each ramp served (by arrival) and answered within tolerance in every checked second.
    for qps in RATES:
        verdict = _step(summary, f"ramp-qps {qps}")["figures"]["verdict"]
        assert len(verdict["seconds"]) == 5 and verdict["ok"], verdict
        for row in verdict["seconds"]:
            assert abs(row["served"] - qps) <= qps * TOLERANCE, verdict
            assert abs(row["answered"] - qps) <= qps * TOLERANCE, verdict
            assert row["p99_ms"] is not None, verdict
        shares = verdict["clients"]
        assert sum(shares) == qps and max(shares) - min(shares) <= 1
        fleet.figures[f"ramp-{qps}"] = {k: verdict[k] for k in
                                        ("served", "answered", "scheduled", "p50_ms", "p99_ms")}
    assert _step(summary, "ramp-qps 0")["figures"]["verdict"]["served"] == [0] * 5

    # Group envelopes ran during both phases; the ledger is balanced.
    ledger = _step(summary, "collect")["figures"]["ledger"]
    assert ledger["balanced"] and ledger["groups_created"] > 0 and ledger["claims_granted"] > 0

    # Graphite's sums over the run equal the server's own counts.
    sums = _step(summary, "graphite sums")["figures"]
    assert set(sums["server"]) == {"logins", "shakes", "envelopes_generated", "claims_granted"}
    assert sums["graphite"] == sums["server"]
    assert sums["server"]["logins"] == CLIENTS * CONNECTIONS_PER_CLIENT
    assert sums["server"]["shakes"] >= sum(RATES) * 10  # both holds' worth at least

    # The report: index.html and the PNGs, drawn from the monitor host's Graphite.
    run_dir = fleet.experiment.run_dir
    report = json.loads((run_dir / "report.json").read_text())
    assert report["source"].startswith("Graphite http://127.0.0.1:")
    assert (run_dir / "index.html").exists() and (run_dir / "qps.png").stat().st_size > 5000
    assert (run_dir / "collect" / server / "hongbao-server.log").stat().st_size > 0
    fleet.figures["report"] = str(run_dir)


def test_check_diff_after_deploy_changes_nothing(fleet):
    checked = play(fleet, "deploy.yml", "--check", "--diff", name="deploy-check")
    assert all(r["changed"] == 0 for r in checked["recap"].values())


def _ssh(f: Fleet, host, *command: str, check: bool = True) -> str:
    return subprocess.run(
        ["ssh", "-i", str(f.key_file), "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
         f"root@{host.address}", *command],
        capture_output=True, text=True, check=check, timeout=30).stdout


def test_ramp_fails_when_the_server_does_not_serve_the_rate(fleet):
    """A SET stopped (SIGSTOP) for the checked seconds: the send stamps would still
    count the rate; what the server served does not, and ramp-qps says so."""
    server = fleet.hosts[0]
    stats = json.loads(_ssh(fleet, server, "python3", "-c",
                            "'import urllib.request as u; "
                            "print(u.urlopen(\"http://127.0.0.1:8989/stats\").read().decode())'"))
    pid = stats["per_set"][0]["pid"]
    report = fleet.state_dir / "ramp-stopped.json"
    qps = 1000
    _ssh(fleet, server, "kill", "-STOP", str(pid))
    try:
        failed = play(fleet, "ramp-qps.yml", "-e", f"qps={qps}", "-e", f"ramp_report={report}",
                      "-e", "ramp_verify_seconds=3", "-e", "ramp_settle_seconds=0",
                      name="ramp-stopped", fails=True)
    finally:
        # (On a slow day the supervisor may have replaced the hung SET already.)
        _ssh(fleet, server, "kill", "-CONT", str(pid), check=False)
    verdict = json.loads(report.read_text())
    fleet.figures["ramp-stopped"] = {k: verdict[k] for k in ("served", "answered", "scheduled")}
    assert not verdict["ok"]
    assert all(served < qps * (1 - TOLERANCE) for served in verdict["served"]), verdict
    assert any("served" in failure for failure in verdict["failures"])
    assert f"{qps}/s not served" in failed["output"]
    assert "served" in failed["output"] and str(verdict["served"]) in failed["output"]
    # The SET resumes (or its replacement takes the users back): every connection
    # is held again and the next ramp is served.
    play(fleet, "start.yml", name="start-resumed")
    play(fleet, "ramp-qps.yml", "-e", f"qps={qps}", name="ramp-resumed")


def test_paramiko_connection(fleet):
    """The same inventory over paramiko: an idempotent slice of deploy (on one host of
    each group: paramiko is slow, the other 16 clients are the same), and status."""
    one_each = ",".join(h.name for h in (fleet.hosts[0], fleet.hosts[1], fleet.hosts[-1]))
    result = play(fleet, "deploy.yml", "-e", "ansible_connection=paramiko",
                  "--tags", "limits,sysctl,ntp", "--limit", one_each, name="deploy-paramiko")
    assert set(result["recap"]) == set(one_each.split(","))
    assert all(r["changed"] == 0 for r in result["recap"].values())
    status = play(fleet, "status.yml", "-e", "ansible_connection=paramiko", "-vvv",
                  name="status-paramiko")
    assert "ESTABLISH PARAMIKO SSH CONNECTION" in status["output"]


def test_stop_leaves_every_host_down(fleet):
    fleet.experiment.stop()
    rows = fleet.experiment.status("status after stop", running=False)
    assert len(rows) == 19
    for row in rows:
        if row["role"] != "monitor":
            assert not row["service_up"] and int(row["established"]) == 0, row
    for host in fleet.hosts[:1 + CLIENTS]:
        for port in (1025, 8989, 9090):
            with socket.socket() as sock:
                sock.settimeout(1)
                assert sock.connect_ex((host.address, port)) != 0, (host.name, port)


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
