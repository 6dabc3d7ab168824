"""Flags, environment and config file: precedence, validation and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq
import zmq.auth

from kvcache_exporter.config import ConfigError, load
from kvcache_exporter.config.options import DEFAULT_SOURCE


def test_defaults_subscribe_to_the_default_engine_endpoint() -> None:
    cfg = load([], environ={})
    assert [f"{s.name}={s.endpoint}" for s in cfg.sources] == [DEFAULT_SOURCE]
    assert cfg.listen_address == ":9477"
    assert cfg.telemetry_path == "/metrics"
    assert cfg.collector.sample_ratio == 1.0
    assert cfg.receive_hwm >= 100_000


def test_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text(
        "collector.sample-ratio: 0.25\nweb.listen-address: ':1'\nlog.level: debug\n"
        "source:\n  - name: a\n    endpoint: tcp://127.0.0.1:5557\n    replay: tcp://127.0.0.1:5558\n"
    )
    env = {"KVCACHE_EXPORTER_WEB_LISTEN_ADDRESS": ":2", "KVCACHE_EXPORTER_LOG_LEVEL": "warn"}
    cfg = load(["--config.file", str(file), "--log.level", "error"], environ=env)
    assert cfg.collector.sample_ratio == 0.25  # file only
    assert cfg.listen_address == ":2"  # env beats file
    assert cfg.log_level == "error"  # flag beats env
    assert cfg.sources[0].replay == "tcp://127.0.0.1:5558"


def test_repeatable_sources_from_flags_and_env() -> None:
    cfg = load(["--source", "a=tcp://127.0.0.1:1", "--source", "b=tcp://*:2,bind"], environ={})
    assert [s.name for s in cfg.sources] == ["a", "b"]
    assert cfg.sources[1].binds
    cfg = load([], environ={"KVCACHE_EXPORTER_SOURCE": "a=tcp://h:1;b=ipc:///tmp/x,bind"})
    assert [s.endpoint for s in cfg.sources] == ["tcp://h:1", "ipc:///tmp/x"]


def test_buckets_from_flag() -> None:
    cfg = load(["--collector.duration-buckets", "0.5,1,10"], environ={})
    assert cfg.collector.duration_buckets == (0.5, 1.0, 10.0)


def test_max_adapters_from_flag_and_env() -> None:
    assert load([], environ={}).collector.max_adapters == 32
    assert load(["--collector.max-adapters", "3"], environ={}).collector.max_adapters == 3
    env = {"KVCACHE_EXPORTER_COLLECTOR_MAX_ADAPTERS": "250"}
    assert load([], environ=env).collector.max_adapters == 250


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--collector.sample-ratio", "2"], {}, "--collector.sample-ratio: must be in (0, 1]"),
        (["--collector.sample-ratio", "x"], {}, "--collector.sample-ratio"),
        (["--web.listen-address", "nope"], {}, "--web.listen-address"),
        (["--web.telemetry-path", "metrics"], {}, "--web.telemetry-path"),
        (["--log.level", "loud"], {}, "--log.level"),
        (["--collector.duration-buckets", "3,2"], {}, "ascending"),
        (["--source", "novalue"], {}, "--source"),
        (["--source", "a=http://x:1"], {}, "tcp://"),
        (["--source", "a=tcp://x"], {}, "port"),
        (["--source", "a=tcp://x:1,frob"], {}, "unknown option"),
        (["--source", "a=tcp://x:1", "--source", "a=tcp://y:1"], {}, "given twice"),
        (
            [arg for i in range(256) for arg in ("--source", f"e{i}=tcp://x:{i + 1}")],
            {},
            "pool 'default' has 256 sources, at most 255",
        ),
        (["--no-such-flag"], {}, "unrecognized arguments"),
        ([], {"KVCACHE_EXPORTER_COLLECTOR_MAX_TRACKED_BLOCKS": "-3"}, "MAX_TRACKED_BLOCKS"),
        (["--config.file", "/nonexistent.yaml"], {}, "--config.file /nonexistent.yaml"),
        (["--otlp.protocol", "carrier-pigeon"], {}, "--otlp.protocol"),
        (["--collector.max-adapters", "0"], {}, "--collector.max-adapters: must be in 1..250"),
        (["--collector.max-adapters", "251"], {}, "--collector.max-adapters"),
        (["--source", "a=tcp://x:1,report-mode=partial"], {}, "unknown option"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_setting(
    argv: list[str], env: dict[str, str], needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(argv, environ=env)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_bad_config_files(tmp_path: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("a: [\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("colector.sample-ratio: 0.5\n")
    for path, needle in ((bad_yaml, "not valid YAML"), (unknown, "unknown key")):
        with pytest.raises(ConfigError, match=needle):
            load(["--config.file", str(path)], environ={})


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """exporter.key_secret, engine.key, and allowed/ with two publishers' public keys."""
    zmq.auth.create_certificates(tmp_path, "exporter")
    zmq.auth.create_certificates(tmp_path, "engine")
    (tmp_path / "allowed").mkdir()
    for name in ("a", "b"):
        zmq.auth.create_certificates(tmp_path / "allowed", name)
    return tmp_path


def test_curve_roles_per_source(keys: Path) -> None:
    cfg = load(
        [
            "--source.curve.key-file", str(keys / "exporter.key_secret"),
            "--source", f"e=tcp://h:1,replay=tcp://h:2,curve.engine-key={keys / 'engine.key'}",
            "--source", f"agent=tcp://*:3,curve.allow={keys / 'allowed'}",
            "--source", "plain=tcp://127.0.0.1:4",
        ],
        environ={},
    )  # fmt: skip
    exporter_public, _ = zmq.auth.load_certificate(keys / "exporter.key_secret")
    engine_public, _ = zmq.auth.load_certificate(keys / "engine.key")
    client, server = cfg.curve["e"], cfg.curve["agent"]
    assert client.public_key == server.public_key == exporter_public
    assert client.server_key == engine_public and not client.is_server
    assert server.is_server and server.zap_domain == "agent"
    assert server.allowed_keys == {
        zmq.auth.load_certificate(keys / "allowed" / f"{name}.key")[0] for name in ("a", "b")
    }
    assert "plain" not in cfg.curve


def test_source_mappings_in_the_config_file(keys: Path) -> None:
    """Every option has a mapping form, nested or dotted; an unknown key is an error, never
    a silently plain source."""
    file = keys / "c.yaml"
    file.write_text(
        f"source.curve.key-file: {keys / 'exporter.key_secret'}\n"
        "source:\n"
        "  - name: e\n    endpoint: tcp://h:1\n    replay: tcp://h:2\n    topic: kv\n"
        f"    curve.engine-key: {keys / 'engine.key'}\n"
        "    capacity: {GPU: 4000, CPU: 16000}\n"
        "  - name: node\n    endpoint: tcp://*:3\n    bind: true\n"
        f"    curve: {{allow: {keys / 'allowed'}}}\n"
        "  - {name: plain, endpoint: 'ipc:///tmp/x', bind: false, replay: '', capacity: 9}\n"
    )
    cfg = load(["--config.file", str(file)], environ={})
    e, node, plain = cfg.sources
    assert (e.replay, e.topic, e.curve_engine_key) == ("tcp://h:2", "kv", str(keys / "engine.key"))
    assert e.capacity == (("GPU", 4000), ("CPU", 16000))
    assert node.bind_flag and node.curve_allow == str(keys / "allowed")
    assert cfg.curve["node"].is_server and not cfg.curve["e"].is_server
    assert not plain.binds and plain.replay is None and plain.capacity == (("", 9),)

    for typo in ("curve: {alow: /etc/kv}", "curve_allow: /etc/kv", "repaly: tcp://h:2"):
        file.write_text(f"source:\n  - name: x\n    endpoint: tcp://*:3\n    {typo}\n")
        with pytest.raises(ConfigError, match="unknown option") as info:
            load(["--config.file", str(file)], environ={})
        assert "\n" not in str(info.value)


def test_curve_mistakes_are_one_line_errors(keys: Path) -> None:
    own = ["--source.curve.key-file", str(keys / "exporter.key_secret")]
    engine = ["--source", f"e=tcp://h:1,curve.engine-key={keys / 'engine.key'}"]
    cases = [
        (engine, "source e: CURVE needs the exporter's own key pair"),
        (own, "no source uses CURVE"),
        (
            [*engine, "--source.curve.key-file", str(keys / "engine.key")],
            f"--source.curve.key-file {keys / 'engine.key'}: no secret-key",
        ),
        (
            [*own, "--source", "e=tcp://h:1,curve.engine-key=/absent.key"],
            "source e: curve.engine-key /absent.key: no such file",
        ),
        (
            [*own, "--source", f"e=tcp://*:1,curve.allow={keys}/absent"],
            f"source e: curve.allow {keys}/absent: no such directory",
        ),
        ([*engine, "--source.curve.key-file", "/absent"], "--source.curve.key-file: no such file"),
    ]
    for argv, needle in cases:
        with pytest.raises(ConfigError) as info:
            load(argv, environ={})
        assert needle in str(info.value)
        assert "\n" not in str(info.value)
