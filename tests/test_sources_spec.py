"""--source parsing and the SPEC §2.1 bind/connect rule."""

from __future__ import annotations

import pytest

from kvcache_exporter.sources.spec import SourceSpec, SourceSpecError


@pytest.mark.parametrize(
    ("text", "binds", "zmq_endpoint"),
    [
        ("a=tcp://127.0.0.1:5557", False, "tcp://127.0.0.1:5557"),
        ("a=tcp://engine.svc:5557", False, "tcp://engine.svc:5557"),
        ("a=tcp://*:5557", True, "tcp://*:5557"),
        ("a=tcp://0.0.0.0:5557", True, "tcp://*:5557"),
        ("a=tcp://[::]:5557", True, "tcp://*:5557"),
        ("a=tcp://127.0.0.1:5557,bind", True, "tcp://127.0.0.1:5557"),
        ("a=ipc:///tmp/kv.sock", False, "ipc:///tmp/kv.sock"),
        ("a=ipc:///tmp/kv.sock,bind", True, "ipc:///tmp/kv.sock"),
    ],
)
def test_bind_or_connect(text: str, binds: bool, zmq_endpoint: str) -> None:
    spec = SourceSpec.parse(text)
    assert spec.binds is binds
    assert spec.zmq_endpoint == zmq_endpoint


def test_options() -> None:
    spec = SourceSpec.parse("vllm-0=tcp://h:5557,replay=tcp://h:5558,topic=kv-events")
    assert spec.name == "vllm-0"
    assert spec.replay == "tcp://h:5558"
    assert spec.topic == "kv-events"
    assert not spec.uses_curve


def test_report_mode() -> None:
    """``report-mode=full``: stores of resident blocks are hit reports; the default and
    ``report-mode=default``: they are physical copies."""
    assert SourceSpec.parse("v=tcp://h:5557,report-mode=full").hit_reports
    assert not SourceSpec.parse("v=tcp://h:5557,report-mode=default").hit_reports
    assert not SourceSpec.parse("v=tcp://h:5557").hit_reports


def test_pool() -> None:
    """``pool=NAME`` names the source's routing domain; without it, ``default``."""
    assert SourceSpec.parse("v=tcp://h:5557,pool=llama-70b").pool == "llama-70b"
    assert SourceSpec.parse("v=tcp://h:5557").pool == "default"


def test_curve_options() -> None:
    client = SourceSpec.parse("e=tcp://h:5557,replay=tcp://h:5558,curve.engine-key=/k/e.key")
    assert client.curve_engine_key == "/k/e.key" and client.curve_allow is None
    server = SourceSpec.parse("agent=tcp://*:5557,curve.allow=/etc/kv/engines")
    assert server.curve_allow == "/etc/kv/engines" and server.uses_curve


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a",
        "=tcp://h:1",
        "1a=tcp://h:1",
        "a b=tcp://h:1",
        "a=tcp://h:0",
        "a=tcp://h:99999",
        "a=tcp://:1",
        "a=udp://h:1",
        "a=tcp://h:1,replay=",
        "a=tcp://h:1,replay=h:2",
        "a=tcp://h:1,x=1",
        "a=tcp://h:1,report-mode=",
        "a=tcp://h:1,report-mode=FULL",
        "a=tcp://h:1,pool=",
        "a=tcp://h:1,pool=two words",
        "a=tcp://h:1,curve.engine-key=",
        "a=tcp://h:1,curve.engine-key=e.key,curve.allow=dir",  # client or server, not both
        "a=inproc://x,curve.allow=dir",  # inproc has no handshake
    ],
)
def test_rejects(text: str) -> None:
    with pytest.raises(SourceSpecError):
        SourceSpec.parse(text)
