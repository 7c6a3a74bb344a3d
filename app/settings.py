"""One declaration per setting, feeding CLI flags, the config file and env overrides.

Precedence, lowest first: the default here, the TOML config file (``--config``;
table ``[server]``, ``[client]`` or ``[smoke]``), the environment
(``HONGBAO_<NAME>``, e.g. ``HONGBAO_SETS=8``), then the command line.
Every value passes its validator, whatever its source, so a typo fails at
start-up with the setting's name and the reason — never later under load.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


class SettingError(ValueError):
    """A setting's value is invalid; the message names the setting."""


def _address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host or "0.0.0.0", int(port)


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError("port out of range 0..65535")
    return port


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise ValueError("must be >= 1")
    return n


def _non_negative(value: str) -> int:
    n = int(value)
    if n < 0:
        raise ValueError("must be >= 0")
    return n


def _seconds(value: str) -> float:
    n = float(value)
    if n <= 0:
        raise ValueError("must be > 0 seconds")
    return n


def _sets(value: str) -> int:
    """'auto' (0) or a SET count."""
    return 0 if str(value) == "auto" else _positive(value)


def _range(value: str) -> tuple[int, int]:
    first, sep, last = str(value).partition("-")
    lo, hi = int(first), int(last if sep else first)
    if lo < 1 or hi < lo or hi > 0xFFFFFFFF:
        raise ValueError(f"expected FIRST-LAST with 1 <= FIRST <= LAST, got {value!r}")
    return lo, hi


def _networks(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(v.strip()) for v in str(value).split(",") if v.strip())


def _addresses(value: str) -> tuple[str, ...]:
    return tuple(str(ipaddress.ip_address(v.strip())) for v in str(value).split(",") if v.strip())


def _choice(*options: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return value

    return check


@dataclass(frozen=True)
class Setting:
    name: str
    type: Callable[[str], Any]
    default: Any
    help: str
    sections: tuple[str, ...]
    flag: str = ""
    metavar: str | None = None

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "HONGBAO_" + self.name.upper()


S, C, M = ("server",), ("client",), ("smoke",)

SETTINGS: tuple[Setting, ...] = (
    # --- server
    Setting("host", str, "0.0.0.0", "address the SETs listen on", S),
    Setting("port", _port, "1025", "TCP port shared by every SET (SO_REUSEPORT)", S),
    Setting("control", _address, "127.0.0.1:8989", "HOST:PORT of the HTTP control API", S),
    Setting("sets", _sets, "auto", "SET worker count, or 'auto' (see README: SETs)", S),
    Setting(
        "target_connections", _positive, "100000", "connections 'auto' sizes the SETs for", S
    ),
    Setting("fd_reserve", _positive, "256", "descriptors a SET keeps free for itself", S),
    Setting("journal_dir", str, "var/journal", "directory of the SET journals", S),
    Setting("login_timeout", _seconds, "10", "seconds a new connection has to LOGIN", S),
    Setting("durability", _choice("written", "fdatasync"), "written",
            "answers wait for their journal write, or also its fdatasync (see README)", S),
    Setting("shake_budget", _positive, "100000", "server-wide SHAKEs per second before 17",
            S + M),
    Setting("amount_min", _positive, "1", "smallest shake envelope amount (cents)", S),
    Setting("amount_max", _positive, "500", "largest shake envelope amount (cents)", S),
    Setting("group_amount_min", _positive, "3", "smallest group envelope total (cents)", S),
    Setting("group_amount_max", _positive, "3000", "largest group envelope total (cents)", S),
    Setting("claim_ttl", _seconds, "60", "seconds a group share stays claimable", S),
    Setting("token", str, "", "token that authorises state changes (empty: none)", S + C),
    Setting(
        "allow", _networks, "127.0.0.0/8", "networks allowed to change state without token", S + C
    ),
    # --- client agent
    Setting("server", _address, "127.0.0.1:1025", "HOST:PORT of the hongbao server", C + M),
    Setting("server_control", str, "", "HOST:PORT of the server's control API (clock)", C),
    Setting("users", _range, "1-60000", "userid range FIRST-LAST of this host", C),
    Setting("connections", _non_negative, "0", "connections to hold (0: one per user)", C),
    Setting("client_control", _address, "127.0.0.1:9090", "HOST:PORT of the agent API", C,
            flag="--control"),
    Setting("source", _addresses, "", "local source address(es) to bind, comma separated", C),
    Setting("host_name", str, "", "this host's name in metrics (default: hostname)", C),
    Setting("host_index", _non_negative, "0", "this host's index in the fleet", C),
    Setting("hosts", _positive, "1", "hosts in the fleet (for /qps?total=)", C),
    Setting("qps", _non_negative, "0", "this host's SHAKEs per second at start", C),
    Setting("pacing", _choice("even", "burst"), "even", "spread each second or burst", C + M),
    Setting("ticks", _positive, "100", "pacing ticks per second (same on every host)", C + M),
    Setting("processes", _non_negative, "0", "worker processes (0: as the fd limit needs)", C),
    Setting("connect_rate", _positive, "5000", "new connections per second, whole host", C + M),
    # --- smoke run (one machine: server + simulated client hosts)
    Setting("connections", _positive, "20000", "connections over all simulated hosts", M),
    Setting("hosts", _positive, "3", "simulated client hosts (127.1.0.1, 127.1.0.2, ...)", M),
    Setting("qps", _positive, "10000", "peak SHAKEs per second; phases run 30% and 60%", M),
    Setting("sets", _positive, "4", "server SET workers", M),
    Setting("phase_seconds", _positive, "30", "seconds of each loaded phase", M),
    Setting("idle_seconds", _positive, "10", "seconds of the idle phase", M),
    Setting("run_dir", str, "runs", "directory that gets one run/<timestamp> per run", M),
    # --- shared
    Setting("statsd", str, "", "HOST:PORT of statsd (empty: no metrics)", S + C + M),
    Setting("log_level", _choice("debug", "info", "warning", "error"), "info", "log level",
            S + C + M),
)


@dataclass
class Config:
    """The resolved settings of one section; attribute access by name."""

    section: str
    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def replace(self, **changes: Any) -> Config:
        return Config(self.section, {**self.values, **changes}, dict(self.sources))


def settings_for(section: str) -> list[Setting]:
    return [s for s in SETTINGS if section in s.sections]


def _convert(setting: Setting, raw: Any, source: str) -> Any:
    try:
        return setting.type(str(raw) if not isinstance(raw, str) else raw)
    except (ValueError, TypeError) as exc:
        raise SettingError(f"{setting.name} ({source}): {exc}") from None


def add_arguments(parser: argparse.ArgumentParser, section: str) -> None:
    """Add one flag per setting (values stay raw strings until resolve)."""
    parser.add_argument("--config", help=f"TOML config file (table [{section}])")
    for s in settings_for(section):
        parser.add_argument(
            s.cli_flag,
            dest=s.name,
            default=None,
            metavar=s.metavar or s.name.upper(),
            help=f"{s.help} (default: {s.default or 'empty'}; env {s.env})",
        )


def resolve(section: str, args: argparse.Namespace | None = None,
            environ: dict[str, str] | None = None) -> Config:
    """Merge defaults, config file, environment and flags; validate each."""
    environ = os.environ if environ is None else environ
    file_values: dict[str, Any] = {}
    path = getattr(args, "config", None) if args else None
    if path:
        try:
            with open(path, "rb") as fh:
                file_values = tomllib.load(fh).get(section, {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingError(f"config {path}: {exc}") from None
        known = {s.name for s in settings_for(section)}
        unknown = set(file_values) - known
        if unknown:
            raise SettingError(f"config {path}: unknown [{section}] keys {sorted(unknown)}")
    config = Config(section)
    for s in settings_for(section):
        raw, source = s.default, "default"
        if s.name in file_values:
            raw, source = file_values[s.name], f"config {path}"
        if s.env in environ:
            raw, source = environ[s.env], f"env {s.env}"
        flag_value = getattr(args, s.name, None) if args else None
        if flag_value is not None:
            raw, source = flag_value, f"flag {s.cli_flag}"
        config.values[s.name] = _convert(s, raw, source)
        config.sources[s.name] = source
    return config


def parse(section: str, argv: Sequence[str] | None = None, description: str = "",
          extra: Callable[[argparse.ArgumentParser], None] | None = None) -> Config:
    """Build the parser for ``section``, parse ``argv`` and resolve; exits 2 on a bad value."""
    parser = argparse.ArgumentParser(prog=f"hongbao-{section}", description=description)
    add_arguments(parser, section)
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    try:
        config = resolve(section, args)
    except SettingError as exc:
        parser.error(str(exc))
    for key, value in vars(args).items():
        if key not in config.values and key != "config":
            config.values[key] = value
    return config
