"""The local metrics stack: node statsd -> carbon-cache (whisper) -> graphite-web.

How to run::

    python -m monitor.stack install   # venv + npm packages, from monitor/*.txt|json
    python -m monitor.stack up        # start all three, wait until they answer
    python -m monitor.stack status    # pids, ports, whether each one answers
    python -m monitor.stack urls      # saved graph URLs for the main views
    python -m monitor.stack env       # HONGBAO_STATSD=... for a process to use it
    python -m monitor.stack down      # stop them (by pid, process group)

Everything binds to 127.0.0.1 (statsd elsewhere only when told,
``--statsd-bind``, for a fleet's monitor host) and lives under one
directory (default ``var/monitor``; ``--root`` or ``HONGBAO_MONITOR_DIR``):
rendered configs in ``conf/``, whisper files in ``storage/``, logs in
``log/``, pids and ports in ``stack.json``, the venv in ``venv/`` (unless
``--venv``). The Python side (carbon, whisper, graphite-web,
gunicorn) has its own venv because graphite-web pins Django < 3.1; the
statsd daemon comes from the npm registry into ``monitor/node_modules``.

Each daemon runs in its own session, so its process group id is its pid and
``down`` (or a test fixture) stops exactly the groups it started, never by
name. A pid from ``stack.json`` is only signalled if its command line still
names this stack's conf directory (pids get reused); see monitor.procs.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from app.local.procs import stop_group
from monitor.procs import STOP_TIMEOUT, StackError, digest, is_ours, run, spawn, tail

MONITOR_DIR = Path(__file__).resolve().parent
PROJECT_DIR = MONITOR_DIR.parent
TEMPLATES = MONITOR_DIR / "conf"
DEFAULT_ROOT = PROJECT_DIR / "var" / "monitor"
DEFAULT_VENV = DEFAULT_ROOT / "venv"
NODE_DIR = MONITOR_DIR  # package.json + package-lock.json; node_modules/ beside them

#: 1 s points for the length of a long test day, then 10 s for a week.
DEFAULT_RETENTIONS = "1s:6h,10s:7d"
START_TIMEOUT = 30.0  # seconds for all three daemons to answer (measured: ~1.5 s)
COMPONENTS = ("carbon", "statsd", "web")  # start order; stopped in reverse


@dataclass
class Ports:
    """Loopback ports; non-default (except statsd's) so a system Graphite can coexist.

    Each one is overridable by ``--<name>`` or ``HONGBAO_MONITOR_<NAME>``.
    """

    statsd_port: int = 8125  # UDP, where app.metrics.statsd sends
    statsd_admin_port: int = 8136  # TCP, statsd's management console ("health")
    carbon_line_port: int = 2103  # TCP, plaintext protocol from statsd
    carbon_pickle_port: int = 2104
    carbon_query_port: int = 7102  # graphite-web's CARBONLINK_HOSTS
    web_port: int = 8180  # graphite-web: /render, /dashboard

    @classmethod
    def from_env(cls) -> Ports:
        ports = cls()
        for f in fields(cls):
            value = os.environ.get(f"HONGBAO_MONITOR_{f.name.upper()}")
            if value:
                setattr(ports, f.name, int(value))
        return ports

    def busy(self) -> list[str]:
        """Names of the ports something already holds (a start would fail late)."""
        taken = []
        for f in fields(self):
            kind = socket.SOCK_DGRAM if f.name == "statsd_port" else socket.SOCK_STREAM
            with socket.socket(socket.AF_INET, kind) as s:
                # as the daemons do: TIME_WAIT leftovers of a stopped stack don't count
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", getattr(self, f.name)))
                except OSError:
                    taken.append(f"{f.name}={getattr(self, f.name)}")
        return taken

    @classmethod
    def free(cls) -> Ports:
        """Ports nobody listens on now (tests: never collide with a running stack)."""
        ports = cls()
        for f in fields(cls):
            kind = socket.SOCK_DGRAM if f.name == "statsd_port" else socket.SOCK_STREAM
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind(("127.0.0.1", 0))
                setattr(ports, f.name, s.getsockname()[1])
        return ports


@dataclass
class Stack:
    """One stack instance: where it lives, its ports, and the processes it runs."""

    root: Path = DEFAULT_ROOT
    venv: Path = DEFAULT_VENV
    ports: Ports = field(default_factory=Ports)
    retentions: str = DEFAULT_RETENTIONS
    #: Where statsd listens. Loopback unless the operator decides otherwise: a
    #: fleet's monitor host takes the clients' UDP (carbon and graphite-web
    #: stay on 127.0.0.1 whatever this says; reach the web by an SSH tunnel).
    statsd_bind: str = "127.0.0.1"
    pids: dict[str, int] = field(default_factory=dict)
    ready_after: dict[str, float] = field(default_factory=dict)  # seconds after start
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    # -- addresses other code needs ------------------------------------------------

    @property
    def statsd_address(self) -> str:
        """What ``app.metrics.Metrics(prefix, address)`` takes on this host."""
        host = "127.0.0.1" if self.statsd_bind in ("0.0.0.0", "127.0.0.1") else self.statsd_bind
        return f"{host}:{self.ports.statsd_port}"

    @property
    def graphite_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.web_port}"

    @property
    def state_file(self) -> Path:
        return self.root / "stack.json"

    # -- install -------------------------------------------------------------------

    def install(self, quiet: bool = True) -> dict[str, float]:
        """Create the venv and node_modules if missing or stale; return seconds spent.

        Idempotent: a stamp holding the hash of the requirement file skips the work
        on the next call, so ``up`` and the test fixture may always call it.
        """
        spent: dict[str, float] = {}
        req = MONITOR_DIR / "requirements.txt"
        stamp = self.venv / ".hongbao-installed"
        wanted = digest(req)
        if not (stamp.exists() and stamp.read_text() == wanted):
            t0 = time.monotonic()
            if not (self.venv / "bin" / "python").exists():
                run([sys.executable, "-m", "venv", str(self.venv)])
            env = dict(os.environ, GRAPHITE_NO_PREFIX="1")  # into the venv, not /opt
            pip = [str(self.venv / "bin" / "pip"), "install", "--disable-pip-version-check"]
            run([*pip, *(["-q"] if quiet else []), "-r", str(req)], env=env)
            (self.venv / "static" / ".collected").unlink(missing_ok=True)  # recollect
            (self.venv / "graphite.db.empty").unlink(missing_ok=True)
            with tempfile.TemporaryDirectory(prefix="hongbao-monitor-") as tmp:
                scratch = Stack(root=Path(tmp), venv=self.venv, ports=self.ports)
                scratch.write_configs()
                scratch.migrate()  # leaves graphite.db.empty and the static files
            stamp.write_text(wanted)
            spent["venv"] = time.monotonic() - t0
        lock = NODE_DIR / "package-lock.json"
        nstamp = NODE_DIR / "node_modules" / ".hongbao-installed"
        ndigest = digest(lock)
        if not (nstamp.exists() and nstamp.read_text() == ndigest):
            npm = shutil.which("npm")
            if npm is None:
                raise StackError("npm not found: install Node.js (Debian: nodejs npm)")
            t0 = time.monotonic()
            # Optional deps of statsd are syslog/hashring helpers we don't use;
            # modern-syslog would need node-gyp.
            run([npm, "ci", "--omit=optional", "--ignore-scripts", "--no-audit", "--no-fund",
                  *(["--loglevel=error"] if quiet else [])], cwd=NODE_DIR)
            nstamp.write_text(ndigest)
            spent["npm"] = time.monotonic() - t0
        return spent

    def installed(self) -> bool:
        return (self.venv / ".hongbao-installed").exists() and (
            NODE_DIR / "node_modules" / "statsd" / "stats.js"
        ).exists()

    # -- configuration ---------------------------------------------------------------

    def write_configs(self) -> None:
        """Render monitor/conf/* into root/conf with this stack's paths and ports."""
        try:
            ipaddress.ip_address(self.statsd_bind)
        except ValueError as exc:
            raise StackError(f"statsd bind address: {exc}") from None
        conf = self.root / "conf"
        for sub in ("conf", "storage/whisper", "storage/lists", "log/webapp", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        secret = conf / ".secret_key"
        if not secret.exists():
            secret.write_text(secrets.token_hex(32))
        values = {
            "root": str(self.root),
            "venv": str(self.venv),
            "monitor": str(MONITOR_DIR),
            "retentions": self.retentions,
            "statsd_bind": self.statsd_bind,
            "secret_key": secret.read_text().strip(),
            **{k: str(v) for k, v in asdict(self.ports).items()},
        }
        outputs = {
            "carbon.conf.in": "carbon.conf",
            "storage-schemas.conf.in": "storage-schemas.conf",
            "storage-aggregation.conf": "storage-aggregation.conf",
            "statsd.js.in": "statsd.js",
            "graphite_settings.py.in": "hongbao_graphite_settings.py",
        }
        for src, dst in outputs.items():
            (conf / dst).write_text(_render((TEMPLATES / src).read_text(), values))

    def _env(self) -> dict[str, str]:
        conf = self.root / "conf"
        return dict(
            os.environ,
            GRAPHITE_ROOT=str(self.root),
            GRAPHITE_CONF_DIR=str(conf),
            GRAPHITE_STORAGE_DIR=str(self.root / "storage"),
            GRAPHITE_SETTINGS_MODULE="hongbao_graphite_settings",
            DJANGO_SETTINGS_MODULE="graphite.settings",
            PYTHONPATH=str(conf),
            PYTHONDONTWRITEBYTECODE="1",
        )

    def _commands(self) -> dict[str, list[str]]:
        conf = self.root / "conf"
        bin_ = self.venv / "bin"
        node = shutil.which("node") or "node"
        return {
            "carbon": [str(bin_ / "python"), str(bin_ / "carbon-cache.py"),
                       f"--config={conf / 'carbon.conf'}", "--nodaemon",
                       f"--logdir={self.root / 'log'}",
                       f"--pidfile={self.root / 'run' / 'carbon-cache-a.pid'}", "start"],
            "statsd": [node, str(NODE_DIR / "node_modules" / "statsd" / "stats.js"),
                       str(conf / "statsd.js")],
            # gunicorn's master forks 2 workers: renders are CPU-bound, 2 cores.
            "web": [str(bin_ / "gunicorn"), "--bind", f"127.0.0.1:{self.ports.web_port}",
                    "--workers", "2", "--timeout", "30", "--graceful-timeout", "2",
                    # gunicorn 27's control socket defaults to one path in $HOME
                    # that a second stack (a test's) would take over.
                    "--no-control-socket",
                    "--pythonpath", str(conf), "--chdir", str(self.root),
                    "graphite.wsgi:application"],
        }

    def migrate(self) -> None:
        """Create graphite-web's sqlite database (dashboards) once per root.

        A fresh root gets a copy of the empty database migrated at install time
        (migrating costs ~4 s on a busy machine; copying, nothing).
        """
        db = self.root / "storage" / "graphite.db"
        template = self.venv / "graphite.db.empty"
        if not db.exists():
            if template.exists():
                shutil.copyfile(template, db)
            else:
                run([str(self.venv / "bin" / "django-admin"), "migrate", "--noinput", "-v",
                      "0"], env=self._env(), cwd=self.root)
                if db.exists():
                    shutil.copyfile(db, template)
        self.collect_static()

    def collect_static(self) -> None:
        """Collect graphite-web's static files (the dashboard's JavaScript) into the venv.

        Shared by every stack, served by whitenoise inside gunicorn; done at
        install time (~8 s) so that a first ``up`` stays fast.
        """
        if (self.venv / "static" / ".collected").exists():
            return
        self.write_configs()
        run([str(self.venv / "bin" / "django-admin"), "collectstatic", "--noinput", "-v", "0"],
             env=self._env(), cwd=self.root)
        (self.venv / "static" / ".collected").touch()

    # -- lifecycle -------------------------------------------------------------------

    def up(self, timeout: float = START_TIMEOUT) -> Stack:
        """Install if needed, start the daemons, return once all three answer."""
        self.install()
        running = self.load_state()
        if running is not None and running.alive():
            raise StackError(f"already running under {self.root} (pids {running.pids})")
        busy = self.ports.busy()
        if busy:
            raise StackError(f"ports in use on 127.0.0.1: {busy} (another stack? see --help)")
        self.write_configs()
        self.migrate()
        # carbon refuses to start over a pidfile whose pid is alive (pids get reused).
        (self.root / "run" / "carbon-cache-a.pid").unlink(missing_ok=True)
        deadline = time.monotonic() + timeout
        try:
            for name, argv in self._commands().items():
                proc = spawn(argv, self.root / "log" / f"{name}.out", self.root, self._env())
                self._procs[name] = proc
                self.pids[name] = proc.pid
                self.save_state()
            self.wait_ready(deadline)
        except BaseException:
            self.down()
            raise
        self.save_dashboard()
        return self

    def save_dashboard(self, name: str = "hongbao") -> bool:
        """Save the main views as graphite-web dashboard `name` (best effort)."""
        from monitor.views import dashboard_state

        body = urllib.parse.urlencode({"state": json.dumps(dashboard_state(name))}).encode()
        try:
            with urllib.request.urlopen(f"{self.graphite_url}/dashboard/save/{name}", body,
                                        timeout=10) as resp:
                return "error" not in json.load(resp)
        except (OSError, ValueError):
            return False

    def wait_ready(self, deadline: float) -> None:
        """Poll every daemon until it answers; record when (``ready_after``)."""
        pending = list(COMPONENTS)
        t0 = time.monotonic()
        while pending:
            for name in list(pending):
                proc = self._procs.get(name)
                if proc is not None and proc.poll() is not None:
                    raise StackError(f"{name} exited with {proc.returncode}; "
                                     f"see {self.root / 'log' / (name + '.out')}\n"
                                     + tail(self.root / "log" / f"{name}.out"))
                if self.probe(name):
                    pending.remove(name)
                    self.ready_after[name] = round(time.monotonic() - t0, 2)
            if not pending:
                time.sleep(0.2)  # a daemon that lost a bind race exits right after
                dead = [n for n, p in self._procs.items() if p.poll() is not None]
                if dead:
                    raise StackError(f"exited after start: {dead}")
                return
            if time.monotonic() > deadline:
                raise StackError(f"not answering after start: {pending}")
            time.sleep(0.1)

    def probe(self, name: str) -> bool:
        """Does this component answer on its port right now?"""
        try:
            if name == "statsd":
                with socket.create_connection(
                        ("127.0.0.1", self.ports.statsd_admin_port), timeout=1) as s:
                    s.sendall(b"health\n")
                    return b"up" in s.recv(100)
            if name == "carbon":
                for port in (self.ports.carbon_line_port, self.ports.carbon_query_port):
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            if name == "web":
                url = f"{self.graphite_url}/render?target=constantLine(1)&format=json&from=-1min"
                with urllib.request.urlopen(url, timeout=5) as resp:
                    return resp.status == 200
        except (OSError, ValueError):
            return False
        raise ValueError(name)

    def alive(self) -> bool:
        return any(is_ours(pid, self.root) for pid in self.pids.values())

    def down(self) -> list[str]:
        """Stop every group this stack started (SIGTERM, then SIGKILL); return names."""
        stopped = []
        for name in reversed(COMPONENTS):
            pid = self.pids.get(name)
            if pid is None:
                continue
            proc = self._procs.get(name)
            if proc is not None or is_ours(pid, self.root):
                stop_group(proc or pid, STOP_TIMEOUT, name)
                stopped.append(name)
            self.pids.pop(name, None)
            self._procs.pop(name, None)
        if self.state_file.exists():
            self.state_file.unlink()
        return stopped

    # -- state file --------------------------------------------------------------------

    def save_state(self) -> None:
        state = {"root": str(self.root), "venv": str(self.venv), "ports": asdict(self.ports),
                 "retentions": self.retentions, "statsd_bind": self.statsd_bind,
                 "pids": self.pids,
                 "statsd": self.statsd_address, "graphite": self.graphite_url}
        self.state_file.write_text(json.dumps(state, indent=1))

    def load_state(self) -> Stack | None:
        """The stack recorded in root/stack.json, or None."""
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        return Stack(root=Path(state["root"]), venv=Path(state["venv"]),
                     ports=Ports(**state["ports"]), retentions=state["retentions"],
                     statsd_bind=state.get("statsd_bind", "127.0.0.1"),
                     pids={k: int(v) for k, v in state["pids"].items()})

    def status(self) -> dict[str, dict[str, object]]:
        return {name: {"pid": self.pids.get(name),
                       "running": bool(self.pids.get(name)) and is_ours(self.pids[name], self.root),
                       "answers": self.probe(name)}
                for name in COMPONENTS}

    # -- reading -------------------------------------------------------------------------

    def render_json(self, target: str, start: int, end: int) -> list[dict]:
        """GET /render?format=json for one target over [start, end] (epoch seconds)."""
        return fetch_series(self.graphite_url, target, start, end)


def running_stack(root: Path | None = None) -> Stack | None:
    """The stack started by ``up`` under root if it answers, else None.

    For ``app.local.smoke``: use ``stack.statsd_address`` for Metrics and
    ``stack.graphite_url`` for the report when this returns a stack.
    """
    root = Path(root or os.environ.get("HONGBAO_MONITOR_DIR") or DEFAULT_ROOT)
    stack = Stack(root=root).load_state()
    if stack is None or not stack.alive() or not stack.probe("statsd"):
        return None
    return stack


def fetch_series(graphite_url: str, target: str, start: int, end: int,
                 timeout: float = 10.0) -> list[dict]:
    """Graphite's JSON for target: [{"target": name, "datapoints": [[v, ts], ...]}]."""
    query = urllib.parse.urlencode({"target": target, "from": int(start), "until": int(end),
                                    "format": "json"})
    with urllib.request.urlopen(f"{graphite_url}/render?{query}", timeout=timeout) as resp:
        return json.load(resp)


def _render(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    if "{{" in text:
        raise StackError(f"unrendered placeholder in template: {text[text.index('{{'):][:40]}")
    return text



def main(argv: list[str] | None = None) -> int:
    """CLI: install | up | down | status | urls | env."""
    from monitor import views

    parser = argparse.ArgumentParser(prog="python -m monitor.stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["install", "up", "down", "status", "urls", "env"])
    parser.add_argument("--root", type=Path,
                        default=Path(os.environ.get("HONGBAO_MONITOR_DIR") or DEFAULT_ROOT))
    parser.add_argument("--venv", type=Path, default=os.environ.get("HONGBAO_MONITOR_VENV"),
                        help="the stack's Python venv (default: ROOT/venv)")
    parser.add_argument("--statsd-bind", default=os.environ.get(
        "HONGBAO_MONITOR_STATSD_BIND", "127.0.0.1"),
        help="address statsd listens on (default 127.0.0.1; carbon and web stay there)")
    parser.add_argument("--retentions", default=os.environ.get(
        "HONGBAO_MONITOR_RETENTIONS", DEFAULT_RETENTIONS))
    env_ports = Ports.from_env()
    for f in fields(Ports):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=int,
                            default=getattr(env_ports, f.name))
    args = parser.parse_args(argv)
    ports = Ports(**{f.name: getattr(args, f.name) for f in fields(Ports)})
    root = args.root.resolve()
    stack = Stack(root=root, venv=Path(args.venv or root / "venv").resolve(), ports=ports,
                  retentions=args.retentions, statsd_bind=args.statsd_bind)
    recorded = stack.load_state()
    try:
        if args.command == "install":
            spent = stack.install()
            print("installed" if spent else "already installed",
                  ", ".join(f"{k} {v:.1f}s" for k, v in spent.items()))
        elif args.command == "up":
            t0 = time.monotonic()
            stack.up()
            ready = ", ".join(f"{k} {v:.1f}s" for k, v in stack.ready_after.items())
            print(f"up in {time.monotonic() - t0:.1f}s ({ready}): "
                  f"statsd udp {stack.statsd_address}, "
                  f"graphite {stack.graphite_url}, data {stack.root}")
            print(f"dashboard: {stack.graphite_url}/dashboard/hongbao  "
                  f"(`python -m monitor.stack urls` for the saved graphs)")
        elif args.command == "down":
            stopped = (recorded or stack).down()
            print("stopped " + (", ".join(stopped) if stopped else "nothing"))
        elif args.command == "status":
            shown = recorded or stack
            for name, st in shown.status().items():
                print(f"{name:7} pid {st['pid']!s:8} running {st['running']!s:5} "
                      f"answers {st['answers']}")
            return 0 if all(st["answers"] for st in shown.status().values()) else 3
        elif args.command == "env":
            # For `make smoke`: settings read HONGBAO_STATSD, the report
            # HONGBAO_GRAPHITE_URL. Prints nothing when the stack is down.
            up = recorded if recorded is not None and recorded.probe("statsd") else None
            if up is None:
                print("metrics: monitor stack not running (`make monitor-up` to watch live); "
                      "graphs come from the run's own records", file=sys.stderr)
            else:
                print(f"HONGBAO_STATSD={up.statsd_address} HONGBAO_GRAPHITE_URL={up.graphite_url}")
                print(f"metrics: statsd {up.statsd_address}; watch live at "
                      f"{up.graphite_url}/dashboard/hongbao", file=sys.stderr)
        elif args.command == "urls":
            shown = recorded or stack
            for name, url in views.graphite_urls(shown.graphite_url).items():
                print(f"{name}: {url}")
    except StackError as exc:
        print(f"monitor.stack: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
