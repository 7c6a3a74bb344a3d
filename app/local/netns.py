"""A private network namespace for big local runs, created and removed by us.

Why: a million loopback connections want kernel settings this machine's
own namespace must not be changed for (a wide ephemeral port range, deep
accept queues). A fresh namespace has its own loopback and its own
``net.*`` sysctls, so a run can tune them freely and touch nothing else;
deleting the namespace takes every setting with it.
"""

from __future__ import annotations

import logging
import os
import subprocess

log = logging.getLogger("hongbao.netns")

# Per-namespace settings for a run of up to ~1M loopback connections.
SCALE_SYSCTLS = {
    "net.ipv4.ip_local_port_range": "1024 65535",  # 64k source ports per address
    "net.core.somaxconn": "65535",  # accept queue per listener (SO_REUSEPORT: per SET)
    "net.ipv4.tcp_max_syn_backlog": "65535",
    "net.ipv4.tcp_tw_reuse": "1",
    "net.unix.max_dgram_qlen": "1024",  # SET inboxes: sockets handed over, queued
}


def available() -> bool:
    """Root and iproute2: namespaces can be made here."""
    return os.geteuid() == 0 and subprocess.run(
        ["ip", "netns", "list"], capture_output=True).returncode == 0


def create(name: str, sysctls: dict[str, str] | None = None) -> list[str]:
    """Create namespace ``name`` with loopback up; return the sysctls that could not be set."""
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        run_in(name, ["ip", "link", "set", "lo", "up"])
    except subprocess.CalledProcessError:
        delete(name)
        raise
    refused = []
    for key, value in (sysctls or {}).items():
        done = subprocess.run(["ip", "netns", "exec", name, "sysctl", "-q", "-w",
                               f"{key}={value}"], capture_output=True, text=True)
        if done.returncode != 0:
            refused.append(f"{key}: {done.stderr.strip()}")
    return refused


def run_in(name: str, cmd: list[str]) -> None:
    subprocess.run(["ip", "netns", "exec", name, *cmd], check=True)


def command_in(name: str, cmd: list[str]) -> list[str]:
    """``cmd`` prefixed to run inside namespace ``name``."""
    return ["ip", "netns", "exec", name, *cmd]


def delete(name: str) -> None:
    done = subprocess.run(["ip", "netns", "delete", name], capture_output=True, text=True)
    if done.returncode != 0 and "No such file" not in done.stderr:
        log.warning("could not delete netns %s: %s", name, done.stderr.strip())
