"""Local test hosts: Debian machines in network namespaces on this one machine.

Each test host is

* a network namespace ``<name>-h<i>`` holding one end of a veth pair (``eth0``,
  address ``<subnet>.<10+i>``), the other end on a bridge ``<name>0`` whose
  address (``<subnet>.1``) is the controller's; no default route and no
  forwarding, so a host reaches the other hosts and the controller and
  nothing else;
* an overlay on the cached root filesystem (:mod:`fleet.local.rootfs`), with
  its own /proc (``/proc/sys`` read-only except ``/proc/sys/net``), /sys
  (read-only), /dev, /run, /tmp and hostname, entered with ``pivot_root`` so
  nothing a playbook does can reach this machine's files;
* ``sshd -D`` as PID 1 of its own PID namespace, started through
  ``nsenter --net=… unshare --mount --uts --ipc --pid --fork --kill-child``:
  killing that ``unshare`` (by PID) kills everything the host ever started,
  and its mounts vanish with its mount namespace.

A "sshd per namespace on the shared filesystem" variant is deliberately not
offered: tasks there write this machine's real /etc and /proc/sys.

Teardown (:meth:`Fleet.down`) works from the state file *and* from what it
finds (namespaces and links by name prefix, processes by namespace inode), so
it also cleans up after a crashed ``up`` or a killed test run.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fleet.local import rootfs

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STATE = REPO_ROOT / "var" / "fleet" / "local"
DEFAULT_INVENTORY = REPO_ROOT / "fleet" / "inventory" / "local" / "hosts.yml"

#: Port of the flat apt repository served on the bridge address.
APT_PORT = 8780
#: How long ``up`` waits for every sshd to greet (10 hosts took ~4 s).
SSH_READY_TIMEOUT = 30.0

# Runs as PID 1 of the host's new PID namespace, inside its new mount
# namespace (propagation private), before becoming sshd.
HOST_INIT = r"""
set -eu
lower=$1 upper=$2 work=$3 root=$4 name=$5
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$root"
mount -t proc proc "$root/proc"
# Kernel tunables are the machine's: read-only, except the per-namespace net.*.
mount --bind "$root/proc/sys" "$root/proc/sys"
mount --bind "$root/proc/sys/net" "$root/proc/sys/net"
mount -o remount,bind,ro "$root/proc/sys"
for p in sysrq-trigger irq bus fs; do
  if [ -e "$root/proc/$p" ]; then
    mount --bind "$root/proc/$p" "$root/proc/$p" && mount -o remount,bind,ro "$root/proc/$p"
  fi
done
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys" || true
mount -t tmpfs -o mode=755,size=4m,nosuid tmpfs "$root/dev"
for d in null zero full random urandom tty; do
  touch "$root/dev/$d" && mount --bind "/dev/$d" "$root/dev/$d"
done
mkdir -p "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
ln -s /proc/self/fd "$root/dev/fd"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
mount -t tmpfs -o mode=755,size=64m,nosuid,nodev tmpfs "$root/run"
mount -t tmpfs -o mode=1777,size=512m,nosuid,nodev tmpfs "$root/tmp"
mkdir -p "$root/run/sshd" "$root/run/lock"
hostname "$name"
cd "$root"
mkdir -p .oldroot
pivot_root . .oldroot
cd /
umount -l /.oldroot
rmdir /.oldroot
exec /usr/sbin/sshd -D -e
"""


def sh(*cmd: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    if not quiet and result.returncode != 0:
        print(f"note: {' '.join(cmd)}: {result.stderr.strip()}", file=sys.stderr)
    return result


@dataclass
class Host:
    index: int
    name: str
    address: str
    netns: str
    veth: str
    pid: int = 0

    def as_dict(self) -> dict:
        return self.__dict__.copy()


@dataclass
class Fleet:
    """One set of local test hosts; ``name`` prefixes everything it creates."""

    name: str = "hbf"
    subnet: str = "10.213.0.0/24"
    state_dir: Path = DEFAULT_STATE
    inventory: Path = DEFAULT_INVENTORY
    cache: Path = rootfs.DEFAULT_CACHE
    hosts: list[Host] = field(default_factory=list)
    apt_pid: int = 0
    #: How many of the last hosts form group ``monitor`` (h1 is the server).
    monitors: int = 0

    # -- naming -------------------------------------------------------------
    @property
    def bridge(self) -> str:
        return f"{self.name}0"

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def controller_address(self) -> str:
        return str(self.network.network_address + 1)

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def key_file(self) -> Path:
        return self.state_dir / "ssh" / "id_ed25519"

    def host(self, index: int) -> Host:
        return Host(
            index=index,
            name=f"{self.name}-h{index}",
            address=str(self.network.network_address + 10 + index),
            netns=f"{self.name}-h{index}",
            veth=f"{self.name}0-h{index}",
        )

    # -- up -----------------------------------------------------------------
    def up(self, clients: int = 17, monitors: int = 1) -> None:
        """The production shape: h1 the server, then ``clients`` client hosts, then
        ``monitors`` monitor hosts (default 1 + 17 + 1 = 19 hosts)."""
        if clients < 1 or monitors < 0 or clients + monitors > 199:
            raise SystemExit("--clients must be 1 or more and at most 199 hosts in all")
        count = 1 + clients + monitors
        if len(self.bridge) > 15 or len(self.host(count).veth) > 15:
            raise SystemExit(f"name {self.name!r} is too long for interface names")
        self.down(quiet=True)
        self.monitors = monitors
        self._check_subnet_free()
        lower = rootfs.build(self.cache)
        started = time.monotonic()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._ensure_key()
        self.hosts = [self.host(i) for i in range(1, count + 1)]
        # Record what we are about to create first: a crash half-way is undone by down().
        self._save()
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.controller_address}/{self.network.prefixlen}",
           "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        self._start_apt_repo()
        for host in self.hosts:
            self._create_network(host)
            self._prepare_root(host)
            host.pid = self._start_host(host, lower)
            self._save()
        self._wait_ssh()
        self._save()
        self.write_inventory()
        print(
            f"{count} test hosts up in {time.monotonic() - started:.1f} s; "
            f"inventory {self.inventory}",
            file=sys.stderr,
        )

    def _check_subnet_free(self) -> None:
        routes = json.loads(sh("ip", "-j", "route", "show", "table", "all").stdout or "[]")
        for route in routes:
            dst = route.get("dst", "")
            if dst in ("", "default") or ":" in dst:
                continue
            try:
                net = ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False)
            except ValueError:
                continue
            if net.overlaps(self.network) and route.get("dev") != self.bridge:
                raise SystemExit(f"subnet {self.subnet} overlaps route {dst} on {route.get('dev')}"
                                 "; choose another with --subnet")

    def _ensure_key(self) -> None:
        if not self.key_file.exists():
            self.key_file.parent.mkdir(parents=True, exist_ok=True)
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{self.name}-controller",
               "-f", str(self.key_file))

    def _start_apt_repo(self) -> None:
        log = open(self.state_dir / "apt-repo.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", "--bind", self.controller_address,
             "--directory", str(rootfs.repo_dir(self.cache)), str(APT_PORT)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        self.apt_pid = proc.pid

    def _create_network(self, host: Host) -> None:
        sh("ip", "netns", "add", host.netns)
        sh("ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0",
           "netns", host.netns)
        sh("ip", "link", "set", host.veth, "master", self.bridge, "up")
        sh("ip", "-n", host.netns, "addr", "add",
           f"{host.address}/{self.network.prefixlen}", "dev", "eth0")
        sh("ip", "-n", host.netns, "link", "set", "lo", "up")
        sh("ip", "-n", host.netns, "link", "set", "eth0", "up")

    def _host_dir(self, host: Host) -> Path:
        return self.state_dir / "hosts" / host.name

    def _prepare_root(self, host: Host) -> None:
        base = self._host_dir(host)
        shutil.rmtree(base, ignore_errors=True)
        upper = base / "upper"
        for sub in ("upper", "work", "root"):
            (base / sub).mkdir(parents=True)
        etc = upper / "etc"
        (etc / "apt").mkdir(parents=True)
        (etc / "hostname").write_text(host.name + "\n")
        hosts_lines = ["127.0.0.1 localhost", f"{self.controller_address} controller"]
        hosts_lines += [f"{h.address} {h.name}" for h in self.hosts]
        (etc / "hosts").write_text("\n".join(hosts_lines) + "\n")
        (etc / "apt" / "sources.list").write_text(
            f"deb [trusted=yes] http://{self.controller_address}:{APT_PORT}/ ./\n"
        )
        # The index of the local repository, as a previous `apt-get update` leaves
        # it: a real Debian host has one, and `--check` resolves packages with it.
        lists = upper / "var" / "lib" / "apt" / "lists"
        lists.mkdir(parents=True)
        shutil.copy(rootfs.repo_dir(self.cache) / "Packages",
                    lists / f"{self.controller_address}:{APT_PORT}_._Packages")
        ssh_dir = upper / "root" / ".ssh"
        ssh_dir.mkdir(parents=True, mode=0o700)
        os.chmod(upper / "root", 0o700)
        auth = ssh_dir / "authorized_keys"
        auth.write_text(Path(str(self.key_file) + ".pub").read_text())
        auth.chmod(0o600)

    def _start_host(self, host: Host, lower: Path) -> int:
        base = self._host_dir(host)
        log = open(base / "host.log", "ab")
        proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{host.netns}",
             "unshare", "--mount", "--uts", "--ipc", "--pid", "--fork", "--kill-child",
             "--propagation", "private",
             "/bin/sh", "-c", HOST_INIT, "host-init",
             str(lower), str(base / "upper"), str(base / "work"), str(base / "root"), host.name],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        return proc.pid

    def _wait_ssh(self) -> None:
        deadline = time.monotonic() + SSH_READY_TIMEOUT
        pending = list(self.hosts)
        while pending:
            host = pending[0]
            try:
                with socket.create_connection((host.address, 22), timeout=1) as conn:
                    conn.settimeout(2)
                    if conn.recv(64).startswith(b"SSH-"):
                        pending.pop(0)
                        continue
            except OSError:
                pass
            if not _alive(host.pid):
                log = (self._host_dir(host) / "host.log").read_text()[-2000:]
                raise RuntimeError(f"test host {host.name} died while starting:\n{log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd on {host.name} ({host.address}) not ready in time")
            time.sleep(0.1)

    # -- inventory ------------------------------------------------------------
    def write_inventory(self) -> None:
        """The generated part of fleet/inventory/local: hosts, groups, how to reach them."""
        server = self.hosts[0]
        cut = len(self.hosts) - self.monitors
        clients, monitors = self.hosts[1:cut], self.hosts[cut:]
        ssh_args = (
            "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
            "-o IdentitiesOnly=yes -o LogLevel=ERROR"
        )
        inventory = {
            "all": {
                "vars": {
                    "ansible_user": "root",
                    "ansible_ssh_private_key_file": str(self.key_file),
                    "ansible_ssh_common_args": ssh_args,
                    "ansible_host_key_checking": False,
                    "local_fleet_controller_address": self.controller_address,
                    "local_fleet_subnet": self.subnet,
                },
                "children": {
                    "server": {"hosts": {server.name: {"ansible_host": server.address}}},
                    "clients": {
                        "hosts": {h.name: {"ansible_host": h.address} for h in clients}
                    },
                    "monitor": {
                        "hosts": {h.name: {"ansible_host": h.address} for h in monitors}
                    },
                },
            }
        }
        self.inventory.parent.mkdir(parents=True, exist_ok=True)
        header = "# Generated by `python -m fleet.local up`; removed by `down`. Do not edit.\n"
        # JSON is YAML: no PyYAML needed on the controller for writing it.
        self.inventory.write_text(header + json.dumps(inventory, indent=2) + "\n")

    # -- state ----------------------------------------------------------------
    def _save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        data = {
            "name": self.name,
            "subnet": self.subnet,
            "apt_pid": self.apt_pid,
            "monitors": self.monitors,
            "hosts": [h.as_dict() for h in self.hosts],
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.state_file)

    def load(self) -> bool:
        if not self.state_file.exists():
            return False
        data = json.loads(self.state_file.read_text())
        self.subnet = data.get("subnet", self.subnet)
        self.apt_pid = data.get("apt_pid", 0)
        self.monitors = data.get("monitors", 0)
        self.hosts = [Host(**h) for h in data.get("hosts", [])]
        return True

    # -- status ---------------------------------------------------------------
    def group(self, host: Host) -> str:
        """The inventory group of a host: server, clients or monitor."""
        if host.index == 1:
            return "server"
        return "monitor" if host.index > len(self.hosts) - self.monitors else "clients"

    def status(self) -> list[dict]:
        self.load()
        rows = []
        for host in self.hosts:
            ssh_ok = False
            try:
                with socket.create_connection((host.address, 22), timeout=1) as conn:
                    conn.settimeout(2)
                    ssh_ok = conn.recv(64).startswith(b"SSH-")
            except OSError:
                pass
            rows.append({"name": host.name, "group": self.group(host), "address": host.address,
                         "pid": host.pid,
                         "alive": _alive(host.pid), "ssh": ssh_ok,
                         "processes": len(_pids_in_netns(host.netns))})
        return rows

    # -- down -----------------------------------------------------------------
    def down(self, quiet: bool = False) -> None:
        """Remove everything this fleet created; safe to call any number of times."""
        self.load()
        netns_names = {h.netns for h in self.hosts}
        listed = sh("ip", "netns", "list", check=False, quiet=True).stdout.split("\n")
        netns_names |= {
            line.split()[0] for line in listed
            if line.strip() and line.split()[0].startswith(f"{self.name}-h")
        }
        victims = {h.pid for h in self.hosts if h.pid}
        for netns in netns_names:
            victims |= _pids_in_netns(netns)
        # The apt repository server, also when the state file that named it is lost.
        victims |= {pid for pid in _all_pids()
                    if _is_our_http_server(pid, self.controller_address)}
        for pid in sorted(victims):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _wait_gone(victims)
        for netns in sorted(netns_names):
            sh("ip", "netns", "del", netns, check=False, quiet=quiet)
        links = json.loads(sh("ip", "-j", "link", "show", check=False, quiet=True).stdout or "[]")
        for link in links:
            ifname = link.get("ifname", "")
            if ifname == self.bridge or ifname.startswith(f"{self.bridge}-h"):
                # A veth may vanish with its namespace meanwhile: not worth a note.
                sh("ip", "link", "del", ifname, check=False, quiet=quiet or ifname != self.bridge)
        _unmount_under(self.state_dir)
        shutil.rmtree(self.state_dir / "hosts", ignore_errors=True)
        self.state_file.unlink(missing_ok=True)
        self.inventory.unlink(missing_ok=True)
        self.hosts = []
        self.apt_pid = 0
        self.monitors = 0


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _pids_in_netns(netns: str) -> set[int]:
    try:
        target = os.stat(f"/run/netns/{netns}")
    except FileNotFoundError:
        return set()
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_ino, st.st_dev) == (target.st_ino, target.st_dev):
            pids.add(int(entry))
    return pids


def _is_our_http_server(pid: int, address: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (b"http.server" in cmdline and address.encode() in cmdline
            and str(APT_PORT).encode() in cmdline)


def _wait_gone(pids: set[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)


def _unmount_under(path: Path) -> None:
    """Mounts only ever live in the hosts' private namespaces; this is a safety net."""
    prefix = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        sh("umount", "-l", point, check=False)
