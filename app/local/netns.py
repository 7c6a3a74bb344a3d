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


def ehash_size(connections: int) -> int:
    """Buckets of a TCP hash for ``connections`` loopback pairs: a power of two >= both ends."""
    return max(1 << 16, min(1 << 23, 1 << (2 * connections - 1).bit_length()))


def create(name: str, sysctls: dict[str, str] | None = None, ehash: int = 0) -> list[str]:
    """Create namespace ``name`` with loopback up; return the settings that could not be made.

    ``ehash``: give the namespace its own established-connections hash of
    that many buckets. By default every namespace shares the machine's
    (262,144 buckets here), and a million pairs are two million sockets:
    chains of eight for every packet to walk. The size can only be chosen
    by the namespace a new one is created from (``tcp_child_ehash_entries``),
    so an outer namespace of ours (``<name>h``) is made for that and the run's
    own is created from inside it; ``delete`` removes both.
    """
    refused = []
    if ehash and _create_with_ehash(name, ehash):
        pass
    else:
        if ehash:
            refused.append("net.ipv4.tcp_child_ehash_entries: not supported here; "
                           "the machine's shared hash is used")
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        run_in(name, ["ip", "link", "set", "lo", "up"])
    except subprocess.CalledProcessError:
        delete(name)
        raise
    for key, value in (sysctls or {}).items():
        done = subprocess.run(["ip", "netns", "exec", name, "sysctl", "-q", "-w",
                               f"{key}={value}"], capture_output=True, text=True)
        if done.returncode != 0:
            refused.append(f"{key}: {done.stderr.strip()}")
    return refused


def _create_with_ehash(name: str, buckets: int) -> bool:
    """``name`` created from an outer namespace whose children get ``buckets``; False if refused."""
    outer = name + "h"
    subprocess.run(["ip", "netns", "add", outer], check=True)
    set_child = subprocess.run(
        ["ip", "netns", "exec", outer, "sysctl", "-q", "-w",
         f"net.ipv4.tcp_child_ehash_entries={buckets}"], capture_output=True)
    if set_child.returncode != 0:
        delete(outer)
        return False
    # nsenter (not ip netns exec): the bind mount must land in our mount namespace
    handle = f"/run/netns/{name}"
    open(handle, "a").close()
    made = subprocess.run(["nsenter", f"--net=/run/netns/{outer}", "unshare",
                           f"--net={handle}", "true"], capture_output=True, text=True)
    if made.returncode != 0:
        log.warning("could not create netns %s inside %s: %s", name, outer, made.stderr.strip())
        os.unlink(handle)
        delete(outer)
        return False
    return True


def run_in(name: str, cmd: list[str]) -> None:
    subprocess.run(["ip", "netns", "exec", name, *cmd], check=True)


def command_in(name: str, cmd: list[str]) -> list[str]:
    """``cmd`` prefixed to run inside namespace ``name``."""
    return ["ip", "netns", "exec", name, *cmd]


def delete(name: str) -> None:
    """Delete namespace ``name`` and the outer one ``create`` may have made for it."""
    for each in (name, name + "h"):
        if not os.path.exists(f"/run/netns/{each}"):
            continue
        done = subprocess.run(["ip", "netns", "delete", each], capture_output=True, text=True)
        if done.returncode != 0:
            log.warning("could not delete netns %s: %s", each, done.stderr.strip())
