"""The cached Debian root filesystem every local test host is an overlay on.

Built once with ``debootstrap --variant=minbase`` (about 45 s on this machine
kind, ~200 MB after cleaning) from the mirror this machine's own apt sources
name (never a hard-coded one), then reused by every ``up`` until the package
lists below change.  Next to it sits a small flat apt repository holding the
packages the roles install *on top of* the base (``python3-venv`` and its
dependencies, ``ethtool``, the monitor host's ``nodejs`` and ``libcairo2``),
so that ``ansible.builtin.apt`` really installs something on the test hosts
although they have no route out: ``up`` serves that directory over HTTP on
the bridge address.

Run on its own to (re)build the cache::

    python -m fleet.local rootfs [--rebuild]
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

SUITE = "bookworm"

#: What a test host has before any playbook ran: enough for sshd, Ansible's
#: Python modules (python3-apt for the apt module) and the clock.
BASE_PACKAGES = (
    "openssh-server",
    "python3",
    "python3-apt",
    "chrony",
    "iproute2",
    "procps",
    "ca-certificates",
)

#: What the roles install on top, served from the local flat repository:
#: the app's venv support and packet counters on every host, and on the
#: monitor host Node.js (statsd) and cairo (graphite-web's renderer).
REPO_PACKAGES = ("python3-venv", "ethtool", "nodejs", "libcairo2")

DEFAULT_CACHE = Path(os.environ.get("HONGBAO_FLEET_CACHE", "/var/cache/hongbao-fleet"))


def cache_key() -> str:
    text = "|".join([SUITE, *BASE_PACKAGES, "--", *REPO_PACKAGES, "v4"])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def rootfs_dir(cache: Path = DEFAULT_CACHE) -> Path:
    return cache / f"rootfs-{SUITE}-{cache_key()}"


def repo_dir(cache: Path = DEFAULT_CACHE) -> Path:
    return cache / f"repo-{SUITE}-{cache_key()}"


def machine_mirror(etc_apt: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's own apt sources use for SUITE's main archive."""
    candidates: list[tuple[str, list[str]]] = []
    for path in sorted(etc_apt.glob("sources.list.d/*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ")):
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
            if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get(
                "types", ""
            ).split():
                continue
            for uri in fields.get("uris", "").split():
                candidates.append((uri, fields.get("suites", "").split()))
    for path in [etc_apt / "sources.list", *sorted(etc_apt.glob("sources.list.d/*.list"))]:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", "", line).split()
            if len(words) >= 3 and words[0] == "deb":
                candidates.append((words[1], [words[2]]))
    for uri, suites in candidates:
        if SUITE in suites and "security" not in uri:
            return uri
    raise SystemExit(f"no apt source for {SUITE} found under {etc_apt}; cannot debootstrap")


def _run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def write_packages_index(repo: Path) -> None:
    """A flat repository's ``Packages`` file (what dpkg-scanpackages writes)."""
    stanzas = []
    for deb in sorted(repo.glob("*.deb")):
        control = subprocess.run(
            ["dpkg-deb", "-f", str(deb)], check=True, capture_output=True, text=True
        ).stdout.rstrip("\n")
        data = deb.read_bytes()
        stanzas.append(
            f"{control}\nFilename: ./{deb.name}\nSize: {len(data)}\n"
            f"MD5sum: {hashlib.md5(data).hexdigest()}\n"
            f"SHA256: {hashlib.sha256(data).hexdigest()}\n"
        )
    (repo / "Packages").write_text("\n".join(stanzas))


def build(cache: Path = DEFAULT_CACHE, rebuild: bool = False) -> Path:
    """Return the cached root filesystem, building it (and the repo) if missing.

    Concurrent callers (two test runs) wait for one build instead of racing.
    """
    target, repo = rootfs_dir(cache), repo_dir(cache)
    if target.exists() and (repo / "Packages").exists() and not rebuild:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists() and (repo / "Packages").exists() and not rebuild:
            return target
        return _build(cache, target, repo)


def _build(cache: Path, target: Path, repo: Path) -> Path:
    for stale in (target, repo, cache / "build", cache / "repo-build"):
        shutil.rmtree(stale, ignore_errors=True)
    work, repo_work = cache / "build", cache / "repo-build"
    (cache / "debs").mkdir(exist_ok=True)
    started = time.monotonic()
    mirror = machine_mirror()
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            # Keep the downloaded .debs: a rebuild (new package list) fetches only
            # what changed; the mirror was measured at 1 s to 13 s per package.
            f"--cache-dir={cache / 'debs'}",
            "--include=" + ",".join(BASE_PACKAGES),
            SUITE,
            str(work),
            mirror,
        ]
    )
    # Nothing may start a daemon inside the chroot while we add to it.
    policy = work / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    _run(["chroot", str(work), "apt-get", "clean"])  # debootstrap's own .debs
    _run(["chroot", str(work), "apt-get", "-qq", "update"])
    _run(
        ["chroot", str(work), "apt-get", "install", "-qq", "-d", "-y",
         "--no-install-recommends", *REPO_PACKAGES],
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    repo_work.mkdir()
    for deb in (work / "var/cache/apt/archives").glob("*.deb"):
        shutil.move(str(deb), repo_work / deb.name)
    write_packages_index(repo_work)
    _run(["chroot", str(work), "ssh-keygen", "-A"])
    policy.unlink()
    _run(["chroot", str(work), "apt-get", "clean"])
    for junk in ("var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale"):
        shutil.rmtree(work / junk, ignore_errors=True)
    (work / "var/lib/apt/lists/partial").mkdir(parents=True)
    # An empty index must look stale, or apt's cache_valid_time skips the update.
    os.utime(work / "var/lib/apt/lists", (0, 0))
    # Host-specific files (sources.list, authorized_keys, hostname) are written
    # into each host's overlay by ``up``; the lower layer stays generic.
    (work / "etc/apt/sources.list").write_text("")
    (work / "etc/resolv.conf").write_text("")
    os.rename(repo_work, repo)
    os.rename(work, target)
    print(f"rootfs built in {time.monotonic() - started:.0f} s: {target}", file=sys.stderr)
    return target
