"""Local test hosts for the fleet playbooks.

Usage (as root, from the repository root)::

    python -m fleet.local up                 # 19 hosts: h1 server, h2-h18 clients, h19 monitor
    python -m fleet.local up --clients 2 --monitors 0   # a 3-host toy
    python -m fleet.local status
    python -m fleet.local run deploy.yml     # ansible-playbook against them
    python -m fleet.local run ramp-qps.yml -e qps=300
    python -m fleet.local down               # also cleans up after a crash

``run`` is ``ansible-playbook -i fleet/inventory/local fleet/playbooks/X``
with ``fleet/ansible.cfg`` and a private ControlPath directory for that run
(a stale ControlPersist master once talked to the wrong namespace).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fleet.local import rootfs
from fleet.local.hosts import DEFAULT_INVENTORY, DEFAULT_STATE, REPO_ROOT, Fleet

FLEET_DIR = REPO_ROOT / "fleet"


def ansible_env(state_dir: Path, control_dir: str) -> dict[str, str]:
    """Environment for ansible-playbook: our config, our home, our control sockets."""
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(FLEET_DIR / "ansible.cfg"),
        ANSIBLE_HOME=str(state_dir / "ansible-home"),
        ANSIBLE_LOCAL_TEMP=str(state_dir / "ansible-home" / "tmp"),
        ANSIBLE_SSH_CONTROL_PATH_DIR=control_dir,
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_NOCOLOR="1",
        PYTHONUNBUFFERED="1",
    )
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def run_playbook(
    playbook: str,
    extra: list[str],
    state_dir: Path = DEFAULT_STATE,
    inventory: Path = DEFAULT_INVENTORY,
    capture: bool = False,
) -> subprocess.CompletedProcess:
    path = Path(playbook)
    if not path.exists():
        path = FLEET_DIR / "playbooks" / playbook
    (state_dir / "ansible-home" / "tmp").mkdir(parents=True, exist_ok=True)
    control_dir = tempfile.mkdtemp(prefix="cp-", dir=state_dir)
    ansible = shutil.which("ansible-playbook", path=str(Path(sys.executable).parent)) or (
        "ansible-playbook"
    )
    try:
        return subprocess.run(
            [ansible, "-i", str(inventory.parent), str(path), *extra],
            env=ansible_env(state_dir, control_dir),
            cwd=REPO_ROOT,
            text=True,
            capture_output=capture,
        )
    finally:
        _close_masters(control_dir)
        shutil.rmtree(control_dir, ignore_errors=True)


def _close_masters(control_dir: str) -> None:
    """Ask each ControlPersist master of this run to exit (ssh -O exit, by socket)."""
    for sock in Path(control_dir).glob("*"):
        subprocess.run(
            ["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "unused"],
            capture_output=True, timeout=10, check=False,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleet.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="hbf", help="prefix of namespaces and links (hbf)")
    parser.add_argument("--subnet", default="10.213.0.0/24", help="test host subnet")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE)
    parser.add_argument("--inventory", type=Path, default=DEFAULT_INVENTORY,
                        help="generated inventory file (its directory is the inventory)")
    parser.add_argument("--cache", type=Path, default=rootfs.DEFAULT_CACHE,
                        help="root filesystem cache (env HONGBAO_FLEET_CACHE)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="create the test hosts and write the local inventory")
    up.add_argument("--clients", type=int, default=17,
                    help="client hosts (17, the production shape)")
    up.add_argument("--monitors", type=int, default=1, choices=(0, 1),
                    help="monitor hosts (1: statsd/Graphite on the last host)")
    sub.add_parser("down", help="remove every namespace, link, process and file of the hosts")
    sub.add_parser("status", help="one line per host: alive, ssh, processes")
    build = sub.add_parser("rootfs", help="build the cached root filesystem and apt repo")
    build.add_argument("--rebuild", action="store_true")
    run = sub.add_parser("run", help="ansible-playbook against the test hosts")
    run.add_argument("playbook")
    run.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    if os.geteuid() != 0 and args.command != "run":
        parser.error("local test hosts need root (namespaces, mounts, links)")
    fleet = Fleet(name=args.name, subnet=args.subnet, state_dir=args.state_dir,
                  inventory=args.inventory, cache=args.cache)
    if args.command == "up":
        try:
            fleet.up(args.clients, args.monitors)
        except BaseException:
            fleet.down(quiet=True)
            raise
    elif args.command == "down":
        fleet.down()
    elif args.command == "status":
        rows = fleet.status()
        for row in rows:
            print(json.dumps(row))
        if not rows:
            print("no local test hosts")
        return 0 if rows and all(r["alive"] and r["ssh"] for r in rows) else 1
    elif args.command == "rootfs":
        print(rootfs.build(args.cache, rebuild=args.rebuild))
    elif args.command == "run":
        return run_playbook(args.playbook, args.args, args.state_dir, args.inventory).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
