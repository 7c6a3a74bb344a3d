#!/usr/bin/env python3
"""Build, on the controller, what the app role ships to fleet hosts.

* ``src-<sha>.tar``: the project's code (``app/``, ``monitor/``,
  requirements, pyproject), byte-for-byte reproducible (sorted names, mtime 0,
  root ownership), so its name changes exactly when the code does;
* ``wheels-<key>.tar``: every wheel ``requirements.txt`` (less ``--exclude``)
  needs, and that filtered ``requirements.txt``, for the
  hosts' Python and platform (``pip download --only-binary``), so hosts
  without a route to a package index (test hosts, firewalled fleets) install
  with ``pip install --no-index --find-links``.  Built once per
  requirements/target combination;
* with ``--monitor``, what the monitor host needs for ``python -m
  monitor.stack install`` without a registry: ``monitor-wheels-<key>.tar``
  (``pip wheel`` of monitor/requirements.txt: carbon, whisper and
  graphite-web are published as sources only, so they are built here, with
  GRAPHITE_NO_PREFIX=1 as the stack's own install does) and
  ``statsd-<key>.tar`` (the ``node_modules`` tree ``npm ci`` makes from
  monitor/package-lock.json, with the stamp that tells the stack it is
  installed).  The wheels are for the controller's Python, which must be the
  hosts' (``--python-version``).

Prints one JSON line: ``{"changed": bool, "src": NAME, "wheels": NAME}``
(plus ``"monitor_wheels"`` and ``"statsd"`` with ``--monitor``).
Run by fleet/roles/app (delegated to the controller, once per play)::

    python3 bundle.py --source REPO --out DIR [--python-version 3.11] [--platform TAG ...]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CODE = ("app", "monitor")
TOP_FILES = ("requirements.txt", "pyproject.toml")
KEEP = 3  # bundles of each kind kept in --out


def code_files(source: Path) -> list[Path]:
    """Tracked and untracked-but-not-ignored files (no node_modules, no caches)."""
    files = [source / name for name in TOP_FILES if (source / name).exists()]
    listed = subprocess.run(
        ["git", "-C", str(source), "ls-files", "-z", "--cached", "--others",
         "--exclude-standard", "--", *CODE],
        capture_output=True, text=True,
    )
    # Only a checkout's own root: a copy inside another checkout's ignored
    # directory (a run's snapshot under runs/) would list nothing.
    if listed.returncode == 0 and (source / ".git").exists():
        names = [n for n in listed.stdout.split("\0") if n]
        candidates = [source / n for n in names]
    else:  # not a git checkout: everything under the code directories
        candidates = [p for package in CODE for p in (source / package).rglob("*")]
    for path in candidates:
        if (path.is_file() and "__pycache__" not in path.parts
                and "node_modules" not in path.parts and path.suffix != ".pyc"):
            files.append(path)
    return sorted(set(files))


def reproducible_tar(entries: list[tuple[str, bytes, int]]) -> bytes:
    """A tar of (name, data, mode) with nothing in it that varies between builds."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        manifest = "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d, _ in entries)
        for name, data, mode in [("MANIFEST", manifest.encode(), 0o644), *entries]:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_once(path: Path, data: bytes) -> bool:
    if path.exists() and path.read_bytes() == data:
        return False
    tmp = path.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(path)
    return True


def build_src(source: Path, out: Path) -> tuple[str, bool]:
    entries = []
    for path in code_files(source):
        mode = 0o755 if os.access(path, os.X_OK) else 0o644
        entries.append((str(path.relative_to(source)), path.read_bytes(), mode))
    data = reproducible_tar(entries)
    name = f"src-{hashlib.sha256(data).hexdigest()[:12]}"
    return name, write_once(out / f"{name}.tar", data)


def host_requirements(source: Path, exclude: list[str]) -> bytes:
    """requirements.txt less the excluded distributions (e.g. the report's matplotlib)."""
    drop = {name.lower().replace("_", "-") for name in exclude}
    kept = []
    for line in (source / "requirements.txt").read_text().splitlines():
        name = re.split(r"[\s<>=!~;\[]", line.strip(), maxsplit=1)[0]
        if name.lower().replace("_", "-") not in drop:
            kept.append(line)
    return ("\n".join(kept) + "\n").encode()


def build_wheels(source: Path, out: Path, args: argparse.Namespace) -> tuple[str, bool]:
    requirements = host_requirements(source, args.exclude)
    target = [f"--python-version={args.python_version}", "--implementation=cp",
              "--only-binary=:all:", *[f"--platform={p}" for p in args.platform]]
    key = hashlib.sha256(requirements + repr(target).encode()).hexdigest()[:12]
    name = f"wheels-{key}"
    if (out / f"{name}.tar").exists():
        return name, False
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        (Path(tmp) / "requirements.txt").write_bytes(requirements)
        subprocess.run(
            [args.pip_python, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
             "-r", str(Path(tmp) / "requirements.txt"), "-d", tmp, *target],
            check=True, stdout=sys.stderr,
        )
        entries = [(p.name, p.read_bytes(), 0o644) for p in sorted(Path(tmp).glob("*.whl"))]
    # The hosts install exactly this file: `pip install --no-index -r requirements.txt`.
    entries.append(("requirements.txt", requirements, 0o644))
    write_once(out / f"{name}.tar", reproducible_tar(entries))
    return name, True


def tree_entries(root: Path, prefix: str) -> list[tuple[str, bytes, int]]:
    """Every file under root as (prefix/relative name, data, mode), sorted."""
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        mode = 0o755 if os.access(path, os.X_OK) else 0o644
        entries.append((f"{prefix}/{path.relative_to(root)}", path.read_bytes(), mode))
    return entries


def build_monitor_wheels(source: Path, out: Path, args: argparse.Namespace) -> tuple[str, bool]:
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if here != args.python_version:
        raise SystemExit(f"--monitor builds wheels for this Python ({here}); the hosts run "
                         f"{args.python_version}: run the controller with Python "
                         f"{args.python_version}")
    requirements = (source / "monitor" / "requirements.txt").read_bytes()
    key = hashlib.sha256(requirements + here.encode()).hexdigest()[:12]
    name = f"monitor-wheels-{key}"
    if (out / f"{name}.tar").exists():
        return name, False
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        subprocess.run(
            [args.pip_python, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
             "-r", str(source / "monitor" / "requirements.txt"), "-w", tmp],
            check=True, stdout=sys.stderr, env={**os.environ, "GRAPHITE_NO_PREFIX": "1"},
        )
        entries = [(p.name, p.read_bytes(), 0o644) for p in sorted(Path(tmp).glob("*.whl"))]
    write_once(out / f"{name}.tar", reproducible_tar(entries))
    return name, True


def build_statsd_tree(source: Path, out: Path) -> tuple[str, bool]:
    lock = (source / "monitor" / "package-lock.json").read_bytes()
    name = f"statsd-{hashlib.sha256(lock).hexdigest()[:12]}"
    if (out / f"{name}.tar").exists():
        return name, False
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("--monitor needs npm on the controller (Debian: nodejs npm)")
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        for manifest in ("package.json", "package-lock.json"):
            shutil.copy(source / "monitor" / manifest, tmp)
        # As monitor.stack installs it: no optional (native) deps, no scripts.
        subprocess.run([npm, "ci", "--omit=optional", "--ignore-scripts", "--no-audit",
                        "--no-fund", "--loglevel=error"], cwd=tmp, check=True, stdout=sys.stderr)
        modules = Path(tmp) / "node_modules"
        # monitor.stack skips `npm ci` when this stamp holds the lock file's digest.
        (modules / ".hongbao-installed").write_text(hashlib.sha256(lock).hexdigest())
        (modules / ".package-lock.json").unlink(missing_ok=True)  # npm's own, time-stamped
        entries = tree_entries(modules, "node_modules")
    write_once(out / f"{name}.tar", reproducible_tar(entries))
    return name, True


def prune(out: Path, prefix: str, keep: str) -> None:
    old = sorted(out.glob(f"{prefix}-*.tar"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in old[KEEP:]:
        if path.stem != keep:
            path.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="the repository root")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--python-version", default="3.11", help="the hosts' Python")
    parser.add_argument("--platform", action="append", default=None,
                        help="wheel platform tags the hosts accept (repeatable)")
    parser.add_argument("--exclude", action="append", default=[],
                        help="distribution in requirements.txt the hosts do not need")
    parser.add_argument("--pip-python", default=sys.executable)
    parser.add_argument("--monitor", action="store_true",
                        help="also the monitor host's wheelhouse and statsd tree")
    args = parser.parse_args()
    args.platform = args.platform or [
        "manylinux_2_36_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
        "manylinux2014_x86_64", "linux_x86_64",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    src, src_changed = build_src(args.source.resolve(), args.out)
    wheels, wheels_changed = build_wheels(args.source.resolve(), args.out, args)
    prune(args.out, "src", src)
    prune(args.out, "wheels", wheels)
    result = {"changed": src_changed or wheels_changed, "src": src, "wheels": wheels}
    if args.monitor:
        source = args.source.resolve()
        monitor_wheels, mw_changed = build_monitor_wheels(source, args.out, args)
        statsd, statsd_changed = build_statsd_tree(source, args.out)
        prune(args.out, "monitor-wheels", monitor_wheels)
        prune(args.out, "statsd", statsd)
        result.update(changed=result["changed"] or mw_changed or statsd_changed,
                      monitor_wheels=monitor_wheels, statsd=statsd)
    shutil.rmtree(args.out / "tmp", ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
