"""One declaration per setting, feeding CLI flags, the config file and env overrides.

Precedence, lowest first: the default here, the TOML config file (``--config``;
table ``[server]``, ``[client]`` or ``[smoke]``), the environment
(``HONGBAO_<NAME>``, e.g. ``HONGBAO_SETS=8``), then the command line.
An environment name means one thing: a setting of the same name but another
meaning in another section has its own (``HONGBAO_SMOKE_QPS`` is the smoke
run's peak, ``HONGBAO_QPS`` a client host's rate).

Every value passes its validator, whatever its source, and then every
section's cross-field checks (``CHECKS``: amount_min <= amount_max, ...), so
a bad setting fails at start-up naming the settings and the reason — never
later under load. The server hands its SETs the same resolved table
(``to_json``/``from_json``), checked again on their side.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
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


def _optional_address(value: str) -> str:
    """Empty (off) or HOST:PORT with a host; kept as the string given."""
    if value:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"expected HOST:PORT (or empty for none), got {value!r}")
    return value


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


def _quiet_ms(value: str) -> int:
    n = int(value)
    if not 0 <= n < 1000:
        raise ValueError("must be 0 to 999 (ms of a second)")
    return n


def _auto_quiet_ms(value: str) -> int:
    """'auto' (-1: the scale bench picks by its ticks) or ``_quiet_ms``."""
    return -1 if str(value) == "auto" else _quiet_ms(value)


def _seconds(value: str) -> float:
    n = float(value)
    if n <= 0:
        raise ValueError("must be > 0 seconds")
    return n


def _auto_non_negative(value: str) -> int | None:
    """'auto' (None: the program picks, e.g. by the SET or connection count) or an int >= 0."""
    return None if str(value) == "auto" else _non_negative(value)


def _auto_count(value: str) -> int:
    """'auto' (0: the program picks) or a positive count."""
    return 0 if str(value) == "auto" else _positive(value)


def _range(value: str) -> tuple[int, int]:
    first, sep, last = str(value).partition("-")
    lo, hi = int(first), int(last if sep else first)
    if lo < 1 or hi < lo or hi > 0xFFFFFFFF:
        raise ValueError(f"expected FIRST-LAST with 1 <= FIRST <= LAST, got {value!r}")
    return lo, hi


def _int_list(value: str) -> tuple[int, ...]:
    """Comma-separated whole numbers >= 0 ('' for none)."""
    out = tuple(int(v) for v in str(value).split(",") if v.strip())
    if any(n < 0 for n in out):
        raise ValueError(f"expected numbers >= 0, got {value!r}")
    return out


def _bool(value: str) -> bool:
    """yes/no, true/false, 1/0 (a bare flag means yes)."""
    text = str(value).lower()
    if text not in ("yes", "no", "true", "false", "1", "0"):
        raise ValueError(f"expected yes or no, got {value!r}")
    return text in ("yes", "true", "1")


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
    env_name: str = ""  # when the name means something else in another section
    secret: bool = False  # never on a child's command line

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        """HONGBAO_<NAME>; a benchmark's own setting HONGBAO_<BENCH>_<NAME> (none clash then)."""
        if self.env_name:
            return self.env_name
        (section, *more) = self.sections
        prefix = BENCH_ENV.get(section, "HONGBAO_") if not more else "HONGBAO_"
        return prefix + self.name.upper()


S, C, M, Z = ("server",), ("client",), ("smoke",), ("scale",)
BS, BC, BF = ("server_bench",), ("client_bench",), ("floor_bench",)
BENCH_ENV = {"scale": "HONGBAO_SCALE_", "server_bench": "HONGBAO_BENCH_SERVER_",
             "client_bench": "HONGBAO_BENCH_CLIENT_", "floor_bench": "HONGBAO_BENCH_FLOOR_"}

SETTINGS: tuple[Setting, ...] = (
    # --- server
    Setting("host", str, "0.0.0.0", "address the SETs listen on", S),
    Setting("port", _port, "1025", "TCP port shared by every SET (SO_REUSEPORT)", S),
    Setting("control", _address, "127.0.0.1:8989", "HOST:PORT of the HTTP control API", S),
    Setting("sets", _auto_count, "auto", "SET worker count, or 'auto' (see README: SETs)", S),
    Setting(
        "target_connections", _positive, "100000", "connections 'auto' sizes the SETs for", S
    ),
    Setting("fd_reserve", _positive, "256", "descriptors a SET keeps free for itself", S),
    Setting("journal_dir", str, "var/journal", "directory of the SET journals", S),
    Setting("login_timeout", _seconds, "10", "seconds a new connection has to LOGIN", S),
    Setting("coalesce_ms", _auto_non_negative, "auto", "ms of the wall-clock slots a SET reads its "
            "sockets in (at the next slot start once one is readable): fewer, larger batches "
            "for up to that much latency; 'auto': longer the more SETs share the machine "
            "(see README: SETs)", S),
    Setting("durability", _choice("written", "fdatasync"), "written",
            "answers wait for their journal write, or also its fdatasync (see README)", S + BS),
    Setting("shake_budget", _positive, "100000", "server-wide SHAKEs per second before 17",
            S + M),
    Setting("amount_min", _positive, "1", "smallest shake envelope amount (cents)", S),
    Setting("amount_max", _positive, "500", "largest shake envelope amount (cents)", S),
    Setting("group_amount_min", _positive, "3", "smallest group envelope total (cents)", S),
    Setting("group_amount_max", _positive, "3000", "largest group envelope total (cents)", S),
    Setting("claim_ttl", _seconds, "60", "seconds a group share stays claimable", S),
    Setting("liveness_timeout", _seconds, "20", "seconds a ready SET or client worker may stay "
            "silent (no heartbeat answer, no report) before it is killed and restarted", S + C),
    Setting("token", str, "", "token that authorises state changes (empty: none)", S + C,
            secret=True),
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
    Setting("pacing", _choice("even", "burst"), "even", "spread each second or burst",
            C + M + Z + BC),
    Setting("ticks", _positive, "100", "pacing ticks per second (same on every host)", C + M),
    Setting("quiet_ms", _quiet_ms, "100", "ms at the end of each second in which no tick sends "
            "(at least; whole ticks): slack for a late pacer or a skewed clock, so a second's "
            "requests arrive within it (see README: Client agent)", C + M + BF),
    Setting("processes", _non_negative, "0", "worker processes (0: as the fd limit needs)", C),
    Setting("connect_rate", _positive, "5000", "new connections per second, whole host", C + M),
    # --- smoke run (one machine: server + simulated client hosts)
    Setting("connections", _positive, "20000", "connections over all simulated hosts", M,
            env_name="HONGBAO_SMOKE_CONNECTIONS"),
    Setting("hosts", _positive, "3", "simulated client hosts (127.1.0.1, 127.1.0.2, ...)", M,
            env_name="HONGBAO_SMOKE_HOSTS"),
    Setting("qps", _positive, "10000", "peak SHAKEs per second; phases run 30% and 60%", M,
            env_name="HONGBAO_SMOKE_QPS"),
    Setting("sets", _positive, "4", "server SET workers (at least; more past 18,000 "
            "connections a SET)", M, env_name="HONGBAO_SMOKE_SETS"),
    Setting("phase_seconds", _positive, "30", "seconds of each loaded phase", M),
    Setting("idle_seconds", _positive, "10", "seconds of the idle phase", M),
    Setting("run_dir", str, "runs", "directory that gets one run/<timestamp> per run", M),
    # --- scale bench (python -m app.bench scale): one machine, many simulated hosts
    Setting("connections", _positive, "1000000", "connections over all simulated hosts", Z),
    Setting("hosts", _positive, "17", "simulated client hosts", Z),
    Setting("phases", _int_list, "30000,60000",
            "fleet-wide QPS of each phase, comma separated ('' for none)", Z),
    Setting("hold", _non_negative, "60", "seconds to hold the connections before the phases",
            Z),
    Setting("phase_seconds", _positive, "60", "seconds of each phase", Z),
    Setting("sets", _auto_count, "auto", "server SET workers, or 'auto' (descriptor limit)", Z),
    Setting("connect_rate", _positive, "12000", "new connections per second over all hosts "
            "(measured: one million logged in at 11,400/s with 0 failures; the server alone "
            "took 16,000/s from C clients)", Z),
    Setting("connect_timeout", _positive, "900", "seconds for every connection to log in", Z),
    Setting("mem_floor_mb", _positive, "1536",
            "stop cleanly when MemAvailable falls below this (MiB)", Z),
    # 'auto': 10, or 5 from 500,000 connections (app.bench.scale.auto_client_nice)
    Setting("client_nice", _auto_non_negative, "auto",
            "nice value of the co-located client agents (0: none); 'auto': 10, or 5 from "
            "500,000 connections (see README: Benchmarks)", Z),
    Setting("netns", _choice("auto", "yes", "no"), "auto",
            "run inside a network namespace it creates (auto: when root)", Z),
    # 20, not the agent's 100: measured (one agent, 12,000 users, 1,800/s), each tick costs a
    # client worker ~0.3 ms of wake-ups, so 100 ticks cost 24-27 µs a request and 20 ticks
    # 12.5-14.6 µs, with p99 still ~10 ms; 'auto' halves that again at one million
    # (app.bench.scale.auto_ticks)
    Setting("ticks", _auto_count, "auto", "pacing ticks per second, of the clients and of "
            "the floor; 'auto': 20, or 10 from 500,000 connections (see README: Benchmarks)",
            Z),
    # 'auto': 200 at 20 ticks, 100 at 10 (app.bench.scale.auto_quiet_ms)
    Setting("quiet_ms", _auto_quiet_ms, "auto", "ms at the end of each second in which no "
            "tick sends, of the clients and of the floor (at least; whole ticks): slack for a "
            "pacer late on the shared box; 'auto': 200 at 20 ticks a second, 100 at 10 (see "
            "README: Benchmarks)", Z),
    Setting("ramp", _non_negative, "0", "after the phases, add this many SHAKEs/s a step "
            "(each phase_seconds long) until a step fails twice in a row; 0: no ramp", Z),
    Setting("ramp_steps", _positive, "10", "at most this many ramp steps", Z),
    Setting("floor", _choice("auto", "no"), "auto", "first run the same traffic through the C "
            "floor (app/bench/floor.c; the syscall floor without a compiler)", Z),
    Setting("floor_seconds", _non_negative, "0",
            "seconds per floor phase (0: the phase length, at most 20)", Z),
    Setting("clients", _choice("hongbao", "floor"), "hongbao",
            "what loads hongbao's server: its client agents, or the floor's C clients (what "
            "the server alone serves when the load costs no more than the floor's)", Z),
    Setting("run_dir", str, "", "this run's directory (default runs/scale-<UTC time>)", Z),
    # --- server bench (python -m app.bench server): one SET against a gevent StreamServer
    Setting("connections", _positive, "5000", "idle logged-in connections to hold", BS),
    Setting("qps", _positive, "50000", "SHAKEs per second offered", BS),
    Setting("seconds", _seconds, "10", "seconds of load", BS),
    Setting("json", str, "", "also write the results to this file", BS),
    Setting("grant", _bool, "no", "shakes get envelopes (a campaign at the offered rate), so "
            "every batch writes the journal: what --durability costs", BS),
    # --- client bench (python -m app.bench.client): one agent against a real server
    Setting("users", _positive, "19000", "users (connections) of the agent", BC),
    Setting("qps", _int_list, "8000,15000", "rates to measure, comma separated", BC),
    Setting("seconds", _seconds, "10", "length of each measuring window", BC),
    Setting("sets", _positive, "4", "server SET workers", BC),
    Setting("source", _addresses, "127.1.0.9,127.1.0.10", "the agent's source addresses", BC,
            flag="--sources"),
    Setting("connect_rate", _positive, "5000", "the agent's new connections per second", BC),
    Setting("restart", _bool, "no", "also measure a server restart", BC),
    # --- floor bench (python -m app.bench.floor): the C floor alone, for comparing by hand
    Setting("connections", _positive, "20000", "connections over all simulated hosts", BF),
    Setting("hosts", _positive, "3", "simulated client hosts", BF),
    Setting("phases", _int_list, "3000", "fleet-wide QPS of each phase, comma separated", BF),
    Setting("phase_seconds", _positive, "10", "seconds of each phase", BF),
    Setting("ticks", _positive, "100", "pacing ticks per second of the C clients", BF),
    # --- shared
    Setting("statsd", _optional_address, "", "HOST:PORT of statsd (empty: no metrics)",
            S + C + M),
    Setting("log_level", _choice("debug", "info", "warning", "error"), "info", "log level",
            S + C + M),
)


@dataclass
class Config:
    """The resolved settings of one section; attribute access by name."""

    section: str
    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    raw: dict[str, str] = field(default_factory=dict)  # each value as given, before its type

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    def replace(self, **changes: Any) -> Config:
        return Config(self.section, {**self.values, **changes}, dict(self.sources),
                      {k: v for k, v in self.raw.items() if k not in changes})


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
        flag = {"nargs": "?", "const": "yes"} if s.type is _bool else {}  # a bare --flag: yes
        parser.add_argument(
            s.cli_flag,
            dest=s.name,
            default=None,
            metavar=s.metavar or s.name.upper(),
            help=f"{s.help} (default: {s.default or 'empty'}; env {s.env})",
            **flag,
        )


def resolve(section: str, args: argparse.Namespace | None = None,
            environ: dict[str, str] | None = None, given: dict[str, Any] | None = None,
            given_source: str = "parent") -> Config:
    """Merge defaults, config file, environment and flags (or ``given``); validate and check."""
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
    for where, values in ((f"config {path}", file_values), (given_source, given or {})):
        unknown = set(values) - known
        if unknown:
            raise SettingError(f"{where}: unknown [{section}] keys {sorted(unknown)}")
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
        if given and s.name in given:
            raw, source = given[s.name], given_source
        config.values[s.name] = _convert(s, raw, source)
        config.sources[s.name] = source
        config.raw[s.name] = str(raw)
    check(config)
    return config


def _named(config: Config, *names: str) -> str:
    """``name (value, source)`` of each setting, for an error message."""
    return ", ".join(f"{n} = {config.raw.get(n, config.values.get(n))!r} "
                     f"({config.sources.get(n, 'computed')})" for n in names)


def _check_amounts(config: Config) -> None:
    if config.amount_min > config.amount_max:
        raise SettingError(f"{_named(config, 'amount_min', 'amount_max')}: amount_min must not "
                           "exceed amount_max (a shake envelope's amount is drawn from "
                           "[amount_min, amount_max])")
    if config.group_amount_min < 3:
        raise SettingError(f"{_named(config, 'group_amount_min')}: must be >= 3 (a group "
                           "envelope has 3 shares of at least 1 cent each)")
    if config.group_amount_min > config.group_amount_max:
        raise SettingError(f"{_named(config, 'group_amount_min', 'group_amount_max')}: "
                           "group_amount_min must not exceed group_amount_max")


def check_budget(config: Config, sets: int) -> None:
    """The stated rule: every SET gets at least 1 SHAKE/s of the server-wide budget.

    The budget splits over the SETs like a campaign (``app.shares.share``);
    below the SET count some SETs would get 0 and answer every SHAKE with 17.
    """
    if config.shake_budget < sets:
        raise SettingError(f"{_named(config, 'shake_budget')} is below the SET count {sets} "
                           f"({_named(config, 'sets')}): every SET needs a budget of at least "
                           "1 SHAKE/s; raise shake_budget or lower sets")


def _check_server(config: Config) -> None:
    _check_amounts(config)
    if config.sets:  # 'auto' is checked once the supervisor has counted them
        check_budget(config, config.sets)


def _check_client(config: Config) -> None:
    if config.host_index >= config.hosts:
        raise SettingError(f"{_named(config, 'host_index', 'hosts')}: host_index must be "
                           "below hosts (hosts are numbered 0..hosts-1)")


def _check_scale(config: Config) -> None:
    if config.hosts > config.connections:
        raise SettingError(f"{_named(config, 'hosts', 'connections')}: every simulated host "
                           "needs at least one connection")


CHECKS: dict[str, Callable[[Config], None]] = {"server": _check_server,
                                               "client": _check_client,
                                               "scale": _check_scale}


def check(config: Config) -> None:
    """The section's cross-field checks; SettingError naming the settings and the reason."""
    rule = CHECKS.get(config.section)
    if rule is not None:
        rule(config)


def to_json(config: Config) -> str:
    """Every setting of ``config`` as given, secrets left out, for a child's ``from_json``."""
    secret = {s.name for s in settings_for(config.section) if s.secret}
    return json.dumps({k: v for k, v in config.raw.items() if k not in secret},
                      separators=(",", ":"))


def from_json(section: str, text: str) -> Config:
    """A parent's ``to_json``, resolved and checked again through this table."""
    return resolve(section, None, environ={}, given=json.loads(text))


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
