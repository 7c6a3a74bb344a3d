"""The classic experiment with one command: the playbooks, step by step, timed.

How to run (``make fleet-experiment`` is the first line)::

    python -m fleet.experiment --local                       # 19 local test hosts (root)
    python -m fleet.experiment --local --connections 1000 --rates 3000,6000 --hold 10
    python -m fleet.experiment --inventory fleet/inventory/production \\
        --connections 60000 --rates 30000,60000 --hold 300    # the real fleet

Steps, each printed with its time and result: deploy, deploy again
(``changed=0``), the NTP offsets the deploy measured, start (every client's
connections logged in), status (the kernel's ESTABLISHED count per host next
to the service's; the monitor host receiving), envelopes (group envelopes at
the classic 200/s and shake envelopes for both phases), ``ramp-qps`` at each
rate (served by arrival and answered in every checked second) followed by a
hold, ``ramp-qps`` at 0 (the load ends), collect (the server's ledger
audit), Graphite's sums against the server's own counts, the report (graphs
from the monitor host's Graphite, through an ssh tunnel), stop and status
again.  Everything lands in one run directory (``runs/fleet-<UTC time>/``):
``index.html`` and PNGs, ``experiment.json`` with every figure, each
playbook's output under ``playbooks/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fleet.local.__main__ import run_playbook
from fleet.local.hosts import DEFAULT_INVENTORY, DEFAULT_STATE, REPO_ROOT, Fleet

RECAP = re.compile(
    r"^(\S+)\s*: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M
)
NTP_OFFSET = re.compile(r"'?(\S+): offset (-?[\d.]+) ms to (\S+), stratum (\d+)")
GRAPHITE_PORT = 8180  # graphite-web on the monitor host's 127.0.0.1 (monitor.stack)
#: Graphite targets compared with the server's own totals after the load.
GRAPHITE_TOTALS = {
    "logins": "stats.counters.hongbao.server.logins.count",
    "shakes": "sumSeries(stats.counters.hongbao.server.shakes.*.count)",
    "envelopes_generated": "stats.counters.hongbao.server.envelopes.generated.count",
    "claims_granted": "stats.counters.hongbao.server.claims.granted.count",
}
SERVER_KEEPS_SECONDS = 300  # per-second history the server's /stats can return
ENVELOPES_SETTLE = 3.0  # seconds for the last pushed group shares to be claimed


class StepFailed(RuntimeError):
    """A step of the experiment did not do what it must; the message says what."""


@dataclass
class Plan:
    """The size of one experiment."""

    connections: int = 60000  # per client host
    rates: list[int] = field(default_factory=lambda: [30000, 60000])  # fleet-wide shakes/s
    hold: float = 60.0  # seconds at each rate after its check
    verify_seconds: int = 5  # checked seconds per ramp
    tolerance: float = 0.02  # fraction of the rate, each checked second
    group_qps: int = 200  # group envelopes per second during both phases (the classic)
    shake_envelope_qps: int = 83  # per client host, as the classic generated them
    start_timeout: int = 600  # seconds for every connection to log in
    ramp_attempts: int = 1  # windows judged per rate before it counts as not served


@dataclass
class Step:
    name: str
    seconds: float
    ok: bool
    result: str
    figures: dict = field(default_factory=dict)


class Experiment:
    """One run of the experiment against an inventory (local test hosts or a fleet)."""

    def __init__(self, inventory: Path, run_dir: Path, plan: Plan,
                 state_dir: Path = DEFAULT_STATE, extra: list[str] | None = None,
                 out=sys.stdout) -> None:
        self.inventory = inventory
        self.run_dir = run_dir
        self.plan = plan
        self.state_dir = state_dir
        self.extra = list(extra or [])
        self.out = out
        self.steps: list[Step] = []
        self.started = time.time()
        self.hosts: dict[str, list[str]] = {}
        self.logins_from: int | None = None
        self.served: dict[int, bool] = {}  # rate -> served in one of its attempts
        self.load_from = 0

    # -- running playbooks ----------------------------------------------------
    def size_vars(self) -> list[str]:
        p = self.plan
        return ["-e", f"hongbao_client_connections={p.connections}",
                "-e", f"hongbao_client_users_per_host={p.connections}",
                "-e", f"start_timeout={p.start_timeout}",
                "-e", f"ramp_tolerance={p.tolerance}",
                "-e", f"ramp_verify_seconds={p.verify_seconds}"]

    def play(self, label: str, playbook: str, *args: str) -> dict:
        """Run one playbook; its output goes to playbooks/<label>.log."""
        started = time.monotonic()
        result = run_playbook(playbook, [*self.size_vars(), *self.extra, *args],
                              state_dir=self.state_dir, inventory=self.inventory, capture=True)
        output = result.stdout + result.stderr
        logs = self.run_dir / "playbooks"
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"{label}.log").write_text(output)
        recap = {m[0]: {"ok": int(m[1]), "changed": int(m[2]), "unreachable": int(m[3]),
                        "failed": int(m[4])} for m in RECAP.findall(output)}
        return {"rc": result.returncode, "recap": recap, "output": output,
                "seconds": round(time.monotonic() - started, 1),
                "changed": sum(r["changed"] for r in recap.values())}

    def record(self, name: str, seconds: float, ok: bool, result: str, **figures) -> Step:
        step = Step(name, round(seconds, 1), ok, result, figures)
        self.steps.append(step)
        mark = "ok  " if ok else "FAIL"
        print(f"[{seconds:7.1f} s] {name:<18} {mark} {result}", file=self.out, flush=True)
        self.save()
        return step

    def playbook_step(self, name: str, playbook: str, *args: str, **figures) -> dict:
        ran = self.play(name.replace(" ", "-"), playbook, *args)
        failed = ran["rc"] != 0 or not ran["recap"] or any(
            r["failed"] or r["unreachable"] for r in ran["recap"].values())
        if failed:
            tail = _failure_lines(ran["output"])
            self.record(name, ran["seconds"], False, tail, changed=ran["changed"], **figures)
            raise StepFailed(f"{name}: {tail}")
        return ran

    # -- the steps ------------------------------------------------------------
    def deploy(self) -> None:
        first = self.playbook_step("deploy", "deploy.yml")
        self.hosts = {g: sorted(h for h in first["recap"] if self._group(h) == g)
                      for g in ("server", "clients", "monitor")}
        self.record("deploy", first["seconds"], True,
                    f"{len(first['recap'])} hosts, changed={first['changed']}",
                    hosts=len(first["recap"]), changed=first["changed"])
        second = self.playbook_step("deploy again", "deploy.yml")
        changed = {h: r["changed"] for h, r in second["recap"].items() if r["changed"]}
        self.record("deploy again", second["seconds"], not changed,
                    "changed=0 on every host" if not changed else f"changed on {changed}",
                    hosts=len(second["recap"]), changed=second["changed"])
        if changed:
            raise StepFailed(f"second deploy changed {changed}")
        offsets = {m[0]: float(m[1]) for m in NTP_OFFSET.findall(second["output"])}
        clients = [h for h in self.hosts["clients"] if h in offsets]
        worst = max((abs(v) for v in offsets.values()), default=0.0)
        self.record("ntp", 0.0, len(clients) == len(self.hosts["clients"]),
                    f"{len(offsets)} hosts verified ({len(clients)} of "
                    f"{len(self.hosts['clients'])} clients), worst offset {worst:.3f} ms",
                    offsets_ms=offsets)

    def _group(self, host: str) -> str:
        if not hasattr(self, "_groups"):
            listed = subprocess.run(
                [shutil.which("ansible-inventory", path=str(Path(sys.executable).parent))
                 or "ansible-inventory", "-i", str(self.inventory.parent), "--list"],
                capture_output=True, text=True, check=True,
                env={**os.environ, "ANSIBLE_CONFIG": str(REPO_ROOT / "fleet" / "ansible.cfg")})
            data = json.loads(listed.stdout)
            self._groups = {h: g for g in ("server", "clients", "monitor")
                            for h in data.get(g, {}).get("hosts", [])}
            self._hostvars = data.get("_meta", {}).get("hostvars", {})
        return self._groups.get(host, "")

    def start(self) -> None:
        before = int(time.time()) - 2
        ran = self.playbook_step("start", "start.yml")
        server = self.hosts["server"][0]
        # Logins are counted from the server process's start: compare them only
        # when this step started it (not when it was running already).
        self.logins_from = before if ran["recap"].get(server, {}).get("changed") else None
        expected = self.plan.connections * len(self.hosts["clients"])
        self.record("start", ran["seconds"], True,
                    f"{expected:,} connections logged in from {len(self.hosts['clients'])} "
                    f"client hosts", connections=expected)

    def status(self, label: str, running: bool) -> list[dict]:
        report = self.run_dir / f"{label.replace(' ', '-')}.json"
        ran = self.playbook_step(label, "status.yml", "-e", f"status_report={report}")
        rows = json.loads(report.read_text())
        per = self.plan.connections
        clients = [r for r in rows if r["role"] == "client"]
        server = [r for r in rows if r["role"] == "server"]
        monitor = [r for r in rows if r["role"] == "monitor"]
        if running:
            expected = per * len(clients)
            wrong = [f"{r['host']} kernel {r['established']} service {r['connections']}"
                     for r in clients
                     if int(r["established"]) != per or int(r["connections"] or 0) != per]
            wrong += [f"{r['host']} kernel {r['established']} service {r['connections']} "
                      f"(expected {expected})" for r in server
                      if int(r["established"]) != expected
                      or int(r["connections"] or 0) != expected]
            wrong += [f"{r['host']} not receiving" for r in monitor
                      if not r["service_up"] or int(r["received_last_minute"]) == 0]
            result = (f"server {server[0]['established']} kernel / {server[0]['connections']} "
                      f"service; {len(clients)} clients {per} / {per} each" if server else "")
            if monitor:
                result += (f"; monitor receiving ({monitor[0]['received_last_minute']} "
                           "metrics last minute)")
        else:
            wrong = [f"{r['host']} still up ({r['established']} established)" for r in rows
                     if r["role"] != "monitor" and (r["service_up"] or int(r["established"]))]
            result = f"{len(rows) - len(monitor)} hosts: service down, 0 established"
        self.record(label, ran["seconds"], not wrong, "; ".join(wrong) or result, hosts=rows)
        if wrong:
            raise StepFailed(f"{label}: {wrong}")
        return rows

    def envelopes(self, seconds: float) -> None:
        """Group and shake envelopes for ``seconds`` (0: stop both, let claims settle)."""
        p = self.plan
        group = p.group_qps if seconds else 0
        shake = p.shake_envelope_qps * len(self.hosts["clients"]) if seconds else 0
        ran = self.playbook_step(
            "envelopes" if seconds else "envelopes off", "envelopes.yml",
            "-e", f"group_qps={group}", "-e", f"group_sum={int(group * seconds)}",
            "-e", f"shake_envelope_qps={shake}",
            "-e", f"shake_envelope_sum={int(shake * seconds)}")
        if not seconds:
            time.sleep(ENVELOPES_SETTLE)
            self.record("envelopes off", ran["seconds"] + ENVELOPES_SETTLE, True,
                        f"none generated from now on (waited {ENVELOPES_SETTLE:g} s for claims)")
            return
        self.record("envelopes", ran["seconds"], True,
                    f"group {group}/s and shake envelopes {shake}/s for ~{seconds:.0f} s",
                    group_qps=group, shake_envelope_qps=shake)

    def ramp(self, qps: int) -> dict:
        """ramp-qps at qps; on a shared machine ``ramp_attempts`` > 1 judges a fresh
        window after a failed one (every attempt is recorded and printed)."""
        for attempt in range(1, self.plan.ramp_attempts + 1):
            suffix = f" (attempt {attempt})" if attempt > 1 else ""
            name = f"ramp-qps {qps}{suffix}"
            report = self.run_dir / f"ramp-{qps}{'-' + str(attempt) if suffix else ''}.json"
            ran = self.play(name.replace(" ", "-").replace("(", "").replace(")", ""),
                            "ramp-qps.yml", "-e", f"qps={qps}", "-e", f"ramp_report={report}")
            figures = json.loads(report.read_text()) if report.exists() else {}
            ok = ran["rc"] == 0 and bool(figures.get("ok"))
            if figures:
                p99 = [v for v in figures["p99_ms"] if v is not None]
                p50 = [v for v in figures["p50_ms"] if v is not None]
                result = (f"served {figures['served']} answered {figures['answered']} "
                          f"(scheduled {figures['scheduled']}); p50 ≤ {max(p50, default=0):g}"
                          f" ms, p99 ≤ {max(p99, default=0):g} ms")
            else:
                result = _failure_lines(ran["output"])
            self.record(name, ran["seconds"], ok, result, verdict=figures)
            if not figures:
                raise StepFailed(f"{name}: {result}")
            self.served[qps] = ok
            if ok:
                break
        return figures

    def hold(self, qps: int) -> None:
        time.sleep(self.plan.hold)
        self.record(f"hold {qps}", self.plan.hold, True, f"{qps}/s for {self.plan.hold:g} s")

    def collect(self) -> dict:
        into = self.run_dir / "collect"
        ran = self.playbook_step("collect", "collect.yml", "-e", f"collect_dir={into}")
        stats = json.loads((into / self.hosts["server"][0] / "stats.json").read_text())
        ledger = stats.get("ledger", {})
        ok = bool(ledger.get("balanced")) and ledger.get("complete", True)
        self.record("collect", ran["seconds"], ok,
                    f"ledger {'balanced' if ok else 'NOT balanced'}: generated "
                    f"{ledger.get('generated', {}).get('count')}, granted "
                    f"{ledger.get('granted', {}).get('count')}, groups "
                    f"{ledger.get('groups_created')}, claims {ledger.get('claims_granted')}",
                    ledger=ledger)
        if not ok:
            raise StepFailed(f"ledger not balanced: {ledger}")
        return stats

    def server_stats(self, label: str) -> dict:
        """The server's /stats (with its ledger audit), fetched by collect.yml."""
        into = self.run_dir / label
        self.playbook_step(label, "collect.yml", "-e", f"collect_dir={into}", "--limit", "server")
        return json.loads((into / self.hosts["server"][0] / "stats.json").read_text())

    def compare_graphite(self, url: str, before: dict, after: dict) -> None:
        """Graphite's sums over the load equal the server's own counts of it.

        The ledger is the journal's (it outlives a server restart), so the run's
        part is the difference between the snapshot taken before the load
        (nothing in flight then) and the one after it (the load ended).
        """
        started = time.monotonic()

        def grew(stats_path: tuple[str, ...]) -> int:
            values = []
            for stats in (before, after):
                value = stats
                for key in stats_path:
                    value = value.get(key, 0) if isinstance(value, dict) else 0
                values.append(int(value or 0))
            return values[1] - values[0]

        expected = {
            "envelopes_generated": grew(("ledger", "generated", "count")),
            "claims_granted": grew(("counters", "claims.granted")),
        }
        windows = {}
        if self.logins_from is not None:
            expected["logins"] = int(after["counters"].get("logins", 0))
            windows["logins"] = self.logins_from
        if int(time.time()) - self.load_from < SERVER_KEEPS_SECONDS - 10:
            expected["shakes"] = sum(r["shakes"] for r in after["per_second_arrival"]
                                     if r["second"] >= self.load_from - 2)
        got: dict[str, float] = {}
        deadline = time.monotonic() + 20
        while True:
            got = {k: _graphite_sum(url, GRAPHITE_TOTALS[k],
                                    windows.get(k, self.load_from - 2), int(time.time()) + 10)
                   for k in expected}
            if got == expected or time.monotonic() > deadline:
                break
            time.sleep(1)
        ok = got == expected
        shown = ", ".join(f"{k} {int(got[k])}/{expected[k]}" for k in expected)
        skipped = "" if "shakes" in expected else " (shakes: the run outlasted the server's " \
                                                  f"{SERVER_KEEPS_SECONDS} s of seconds)"
        self.record("graphite sums", time.monotonic() - started, ok,
                    f"Graphite/server: {shown}{skipped}", graphite=got, server=expected)
        if not ok:
            raise StepFailed(f"Graphite sums differ from the server's: {got} vs {expected}")

    def report(self, url: str) -> Path:
        started = time.monotonic()
        cmd = [sys.executable, "-m", "monitor.report", "--run", str(self.run_dir),
               "--graphite", url, "--from", str(int(self.load_from) - 5),
               "--until", str(int(time.time()))]
        done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        (self.run_dir / "playbooks" / "report.log").write_text(done.stdout + done.stderr)
        index = self.run_dir / "index.html"
        pngs = sorted(p.name for p in self.run_dir.glob("*.png"))
        ok = done.returncode == 0 and index.exists() and bool(pngs)
        self.record("report", time.monotonic() - started, ok,
                    f"{index} ({len(pngs)} PNGs)" if ok else (done.stderr or done.stdout)[-500:],
                    command=" ".join(cmd), pngs=pngs)
        if not ok:
            raise StepFailed(f"report failed: {done.stderr[-500:]}")
        return index

    def stop(self) -> None:
        ran = self.playbook_step("stop", "stop.yml")
        self.record("stop", ran["seconds"], True, "clients, then the server")

    # -- the whole thing --------------------------------------------------------
    def run(self, stop: bool = True) -> dict:
        """Every step in order; StepFailed at the first that fails (after stopping)."""
        print(f"experiment: {self.plan.connections:,} connections per client host, rates "
              f"{self.plan.rates}, hold {self.plan.hold:g} s; run directory {self.run_dir}",
              file=self.out, flush=True)
        error: BaseException | None = None
        try:
            self.deploy()
            self.start()
            self.status("status", running=True)
            # A restarted server resumes the envelopes its journal still owes.
            self.envelopes(0)
            before = self.server_stats("server-before")
            self.load_from = int(time.time())
            per_phase = self.plan.hold + self.plan.verify_seconds + 10
            self.envelopes(per_phase * len(self.plan.rates))
            # A rate not served fails the experiment at the end: the later
            # steps still run, so the graphs show what happened.
            for qps in self.plan.rates:
                self.ramp(qps)
                self.hold(qps)
            self.ramp(0)
            self.envelopes(0)
            after = self.collect()
            with GraphiteTunnel(self) as url:
                self.compare_graphite(url, before, after)
                self.report(url)
            missed = [qps for qps, ok in self.served.items() if not ok]
            if missed:
                raise StepFailed(f"rates not served: {missed}")
        except BaseException as exc:
            error = exc
            raise
        finally:
            try:
                if stop:
                    self.stop()
                    self.status("status after stop", running=False)
            finally:
                self.finish(error)
        return self.summary()

    def finish(self, error: BaseException | None = None) -> None:
        total = time.time() - self.started
        failed = [s.name for s in self.steps if not s.ok]
        if error is not None and not isinstance(error, StepFailed):
            failed.append(f"{type(error).__name__}: {error}")
        print(f"[{total:7.1f} s] {'experiment':<18} {'FAIL' if failed else 'ok  '} "
              f"{'failed: ' + ', '.join(failed) if failed else 'every step passed'}; "
              f"{self.run_dir}", file=self.out, flush=True)
        self.save()

    def summary(self) -> dict:
        return {"plan": asdict(self.plan), "inventory": str(self.inventory),
                "started": self.started, "hosts": self.hosts,
                "steps": [asdict(s) for s in self.steps]}

    def save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "experiment.json").write_text(json.dumps(self.summary(), indent=1))


class GraphiteTunnel:
    """``ssh -L`` to graphite-web on the monitor host's loopback; the URL while open."""

    def __init__(self, experiment: Experiment) -> None:
        self.experiment = experiment
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
        exp = self.experiment
        host = exp.hosts["monitor"][0] if exp.hosts.get("monitor") else ""
        if not host:
            raise StepFailed("no monitor host in the inventory: nothing to draw the report from")
        exp._group(host)
        hv = exp._hostvars.get(host, {})
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = ["ssh", "-N", "-o", "ExitOnForwardFailure=yes", "-o", "BatchMode=yes",
               "-L", f"127.0.0.1:{port}:127.0.0.1:{GRAPHITE_PORT}",
               *shlex.split(str(hv.get("ansible_ssh_common_args", ""))),
               *(["-i", hv["ansible_ssh_private_key_file"]]
                 if hv.get("ansible_ssh_private_key_file") else []),
               f"{hv.get('ansible_user', 'root')}@{hv.get('ansible_host', host)}"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                _graphite_sum(url, "constantLine(1)", int(time.time()) - 60, int(time.time()))
                return url
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.3)
        self.__exit__()
        raise StepFailed(f"no tunnel to Graphite on {host}: {' '.join(cmd)}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)


def snapshot_source(dest: Path) -> Path:
    """Copy the code the hosts get (app/, monitor/, requirements, pyproject) to dest.

    Both deploys ship this copy: an edit or a merge in the working tree during
    a run must not make the second deploy "change" something.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for top in ("requirements.txt", "pyproject.toml"):
        shutil.copy2(REPO_ROOT / top, dest / top)
    for package in ("app", "monitor"):
        shutil.copytree(REPO_ROOT / package, dest / package, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "node_modules"))
    return dest


def _graphite_sum(url: str, target: str, start: int, end: int) -> float:
    query = urllib.parse.urlencode({"target": target, "from": start, "until": end,
                                    "format": "json"})
    with urllib.request.urlopen(f"{url}/render?{query}", timeout=20) as resp:
        series = json.load(resp)
    return sum(v for s in series for v, _ in s["datapoints"] if v is not None)


def _failure_lines(output: str) -> str:
    """The lines of a playbook's output that say why it failed (short)."""
    lines = [ln.strip() for ln in output.splitlines()
             if ln.startswith(("fatal:", "[ERROR]", "failed:")) or "FAILED!" in ln]
    return " | ".join(lines)[-1500:] or output[-1500:]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fleet.experiment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true",
                       help="bring up local test hosts (root), run, take them down")
    where.add_argument("--inventory", type=Path, help="an inventory directory (a real fleet)")
    parser.add_argument("--clients", type=int, default=17, help="client hosts (--local)")
    parser.add_argument("--keep-hosts", action="store_true", help="--local: leave them up")
    parser.add_argument("--connections", type=int, help="per client host "
                        "(default: 60000 on a fleet, LOCAL_CONNECTIONS on local hosts)")
    parser.add_argument("--rates", help="fleet-wide shakes/s, comma-separated "
                        "(default: 30000,60000 on a fleet, LOCAL_RATES on local hosts)")
    parser.add_argument("--hold", type=float, help="seconds at each rate (default 60)")
    parser.add_argument("--verify-seconds", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="fraction of the rate each checked second may be off (0.02)")
    parser.add_argument("--group-qps", type=int, default=200)
    parser.add_argument("--ramp-attempts", type=int, default=1,
                        help="windows judged per rate before it fails (a shared machine: 2)")
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--no-stop", action="store_true", help="leave the services running")
    return parser.parse_args(argv)


#: The default size on local test hosts: the largest this machine kind sustains
#: (README "Running on a fleet"); a real fleet defaults to the classic.
LOCAL_CONNECTIONS = 6000
LOCAL_RATES = (3000, 6000)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan(
        connections=args.connections or (LOCAL_CONNECTIONS if args.local else 60000),
        rates=[int(r) for r in args.rates.split(",")] if args.rates else
        list(LOCAL_RATES if args.local else (30000, 60000)),
        hold=args.hold if args.hold is not None else 60.0,
        verify_seconds=args.verify_seconds, tolerance=args.tolerance, group_qps=args.group_qps,
        ramp_attempts=args.ramp_attempts,
        start_timeout=600)
    # Absolute: the playbooks write into it from their own directory.
    run_dir = (args.run_dir or REPO_ROOT / "runs" / time.strftime("fleet-%Y%m%dT%H%M%SZ",
                                                                  time.gmtime())).resolve()
    fleet = None
    inventory = (args.inventory / "hosts.yml") if args.inventory else DEFAULT_INVENTORY
    if args.local:
        if os.geteuid() != 0:
            print("--local needs root (namespaces, mounts, links)", file=sys.stderr)
            return 2
        fleet = Fleet()
        started = time.monotonic()
        fleet.up(clients=args.clients, monitors=1)
        print(f"[{time.monotonic() - started:7.1f} s] {'hosts up':<18} ok   "
              f"{len(fleet.hosts)} local test hosts (1 server, {args.clients} clients, 1 monitor)",
              flush=True)
    source = snapshot_source(run_dir / "src")
    experiment = Experiment(inventory, run_dir, plan, extra=[
        "-e", f"app_source_dir={source}",
        "-e", f"app_bundle_dir={REPO_ROOT / 'var' / 'fleet' / 'bundle'}"])
    try:
        experiment.run(stop=not args.no_stop)
    except StepFailed as exc:
        print(f"experiment failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if fleet is not None and not args.keep_hosts and not args.no_stop:
            fleet.down()
            print(f"{'':11} {'hosts down':<18} ok   every local test host removed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
