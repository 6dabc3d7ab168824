"""What a ``--source`` flag says: a named engine endpoint and how to reach it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

_NAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,62}$")
_BIND_HOSTS: Final = frozenset({"*", "0.0.0.0", "::", "[::]"})
_TRANSPORTS: Final = ("tcp://", "ipc://", "inproc://")
REPORT_MODES: Final = ("default", "full")
DEFAULT_POOL: Final = "default"
MAX_POOL_ENGINES: Final = 255  # the pool index counts a key's engines in one byte


class SourceSpecError(ValueError):
    """A ``--source`` value that cannot be used; the message says why."""


def parse_capacity(key: str, value: str) -> tuple[str, int]:
    """A ``capacity=N`` (every medium) or ``capacity.MEDIUM=N`` setting, as (medium, N), medium
    ``""`` for every medium. Plain pairs: the what-if model's settings are built from them."""
    medium = key.removeprefix("capacity").removeprefix(".")
    if key != "capacity" and (not key.startswith("capacity.") or not medium):
        raise ValueError(f"expected capacity= or capacity.MEDIUM=, got {key!r}")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{key}: expected a positive number of blocks, got {value!r}")
    return medium, int(value)


def _host_of(endpoint: str) -> str:
    rest = endpoint[len("tcp://") :]
    if rest.startswith("["):
        return rest[: rest.find("]") + 1] if "]" in rest else rest
    return rest.rsplit(":", 1)[0]


def _check_endpoint(endpoint: str, what: str) -> None:
    if not endpoint.startswith(_TRANSPORTS):
        raise SourceSpecError(f"{what} {endpoint!r}: expected tcp://, ipc:// or inproc://")
    if endpoint.startswith("tcp://"):
        rest = endpoint[len("tcp://") :]
        port = rest.rsplit(":", 1)[-1] if ":" in rest else ""
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise SourceSpecError(f"{what} {endpoint!r}: needs a port in 1..65535")
        if not _host_of(endpoint):
            raise SourceSpecError(f"{what} {endpoint!r}: needs a host")
        urlsplit(endpoint)  # rejects malformed IPv6 brackets


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """One engine event stream:
    ``NAME=ENDPOINT[,replay=ENDPOINT][,topic=PREFIX][,bind][,capacity=N][,capacity.MEDIUM=N]``
    ``[,curve.engine-key=FILE | ,curve.allow=DIR][,report-mode=full][,pool=NAME]``.

    ``capacity`` is the engine's cache size in blocks for the what-if model, as (medium, N)
    pairs (medium ``""``: every medium); without it the model uses the capacity it observes.

    ``curve.engine-key`` (the engine's public key certificate: the exporter is the CURVE
    client) or ``curve.allow`` (a directory of the publishers' public keys: the exporter is
    the CURVE server and hears no one else) switch the source's sockets to CURVE.

    ``report-mode=full`` says the engine re-sends ``BlockStored`` for prefix-cache hits (vLLM's
    per-request ``kv_cache_report_mode: full``): its stores of resident blocks are accesses.
    By default (``report-mode=default``) they are physical copies, as vLLM sends them.

    ``pool`` names the routing domain the engine belongs to (replicas of one model that one
    router chooses between); sources that name none form the pool ``default``.
    """

    name: str
    endpoint: str
    replay: str | None = None
    topic: str = ""
    bind_flag: bool = False
    capacity: tuple[tuple[str, int], ...] = ()
    curve_engine_key: str | None = None
    curve_allow: str | None = None
    hit_reports: bool = False
    pool: str = DEFAULT_POOL

    @property
    def uses_curve(self) -> bool:
        return self.curve_engine_key is not None or self.curve_allow is not None

    @property
    def binds(self) -> bool:
        """SPEC §2.1: wildcard tcp hosts are bound (engines connect to us); other tcp hosts
        are connected to; ipc/inproc endpoints are connected to unless marked ``bind``."""
        if self.bind_flag:
            return True
        if self.endpoint.startswith("tcp://"):
            return _host_of(self.endpoint) in _BIND_HOSTS
        return False

    @property
    def zmq_endpoint(self) -> str:
        """The endpoint as libzmq spells it (``tcp://*:5557`` for every wildcard host)."""
        if self.endpoint.startswith("tcp://") and _host_of(self.endpoint) in _BIND_HOSTS:
            return "tcp://*:" + self.endpoint.rsplit(":", 1)[1]
        return self.endpoint

    @classmethod
    def parse(cls, text: str) -> SourceSpec:
        name, sep, rest = text.partition("=")
        name = name.strip()
        if not sep or not rest:
            raise SourceSpecError(f"source {text!r}: expected NAME=ENDPOINT[,options]")
        if not _NAME.match(name):
            raise SourceSpecError(
                f"source {text!r}: name {name!r} must match [A-Za-z_][A-Za-z0-9_.:-]*"
            )
        endpoint, *options = (part.strip() for part in rest.split(","))
        _check_endpoint(endpoint, f"source {name}: endpoint")
        replay: str | None = None
        topic = ""
        bind = False
        capacity: dict[str, int] = {}
        curve: dict[str, str] = {}
        hit_reports = False
        pool = DEFAULT_POOL
        for option in options:
            key, has_value, value = option.partition("=")
            if key == "bind" and not has_value:
                bind = True
            elif key == "replay" and value:
                _check_endpoint(value, f"source {name}: replay endpoint")
                if value.startswith("tcp://") and _host_of(value) in _BIND_HOSTS:
                    raise SourceSpecError(
                        f"source {name}: replay endpoint {value!r} is the engine's ROUTER, "
                        "which the exporter connects to: give its address, not a wildcard"
                    )
                replay = value
            elif key == "topic" and has_value:
                topic = value
            elif key.startswith("capacity") and has_value:
                try:
                    medium, blocks = parse_capacity(key, value)
                except ValueError as exc:
                    raise SourceSpecError(f"source {name}: {exc}") from None
                capacity[medium] = blocks
            elif key in ("curve.engine-key", "curve.allow") and value:
                curve[key] = value
            elif key == "report-mode" and value in REPORT_MODES:
                hit_reports = value == "full"
            elif key == "pool" and value:
                if not _NAME.match(value):
                    raise SourceSpecError(
                        f"source {name}: pool {value!r} must match [A-Za-z_][A-Za-z0-9_.:-]*"
                    )
                pool = value
            else:
                raise SourceSpecError(
                    f"source {name}: unknown option {option!r} "
                    "(replay=, topic=, bind, capacity=, capacity.MEDIUM=, "
                    "curve.engine-key=, curve.allow=, report-mode=default|full, pool=)"
                )
        if len(curve) > 1:
            raise SourceSpecError(
                f"source {name}: curve.engine-key= and curve.allow= exclude each other "
                "(the exporter is either the CURVE client or the server)"
            )
        if curve and endpoint.startswith("inproc://"):
            raise SourceSpecError(f"source {name}: CURVE needs a tcp:// or ipc:// endpoint")
        return cls(
            name=name,
            endpoint=endpoint,
            replay=replay,
            topic=topic,
            bind_flag=bind,
            capacity=tuple(capacity.items()),
            curve_engine_key=curve.get("curve.engine-key"),
            curve_allow=curve.get("curve.allow"),
            hit_reports=hit_reports,
            pool=pool,
        )
