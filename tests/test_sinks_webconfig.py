"""--web.config.file: TLS (with client certificates) and basic auth, with a real TLS client."""

from __future__ import annotations

import base64
import http.client
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest

from kvcache_exporter.config import ConfigError, load
from kvcache_exporter.sinks.http import MetricsHTTPServer, Routes
from kvcache_exporter.sinks.webconfig import WebConfig, WebConfigError, load_web_config

from .conftest import require_binary


@dataclass
class PKI:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A CA, a server certificate for 127.0.0.1, a client certificate it signed, and a
    client certificate from a different, self-signed authority."""
    require_binary("openssl")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.crt", "-days", "2", "-subj", "/CN=test-ca", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", "san.ext"]), ("client", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", *ext, cwd=d)  # fmt: skip
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "stranger.key",
             "-out", "stranger.crt", "-days", "2", "-subj", "/CN=stranger", cwd=d)  # fmt: skip
    return PKI(d, d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt",
               d / "client.key", d / "stranger.crt", d / "stranger.key")  # fmt: skip


def serve(web: WebConfig) -> MetricsHTTPServer:
    routes = Routes(
        telemetry_path="/metrics",
        metrics=lambda _: (b"up 1\n", "text/plain; version=0.0.4; charset=utf-8"),
        ready=lambda: (True, "ready"),
        summary=dict,
        export=lambda _query: (b"{}", "application/json"),
    )
    server = MetricsHTTPServer(("127.0.0.1", 0), routes, web)
    server.start()
    return server


@pytest.fixture
def tls_server(pki: PKI) -> Iterator[MetricsHTTPServer]:
    config = pki.dir / "web.yml"
    password = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    config.write_text(
        "tls_server_config:\n"
        "  cert_file: server.crt\n  key_file: server.key\n"  # relative to the file
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"
        "  min_version: TLS12\n"
        f"basic_auth_users:\n  alice: '{password}'\n"
    )
    server = serve(load_web_config(config))
    yield server
    server.stop()


def request(
    server: MetricsHTTPServer, pki: PKI, client: str | None = "client", auth: str | None = None
) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if client is not None:
        ctx.load_cert_chain(pki.dir / f"{client}.crt", pki.dir / f"{client}.key")
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx, timeout=5)
    headers = {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    conn.request("GET", "/metrics", headers=headers)
    response = conn.getresponse()
    return response.status, response.read()


def test_tls_client_certificate_and_password(tls_server: MetricsHTTPServer, pki: PKI) -> None:
    """A verified client certificate and the right password get the metrics, on every try."""
    for _ in range(3):  # the second and third use the remembered bcrypt check
        assert request(tls_server, pki, auth="alice:s3cret") == (200, b"up 1\n")


def test_wrong_or_missing_password_is_401(tls_server: MetricsHTTPServer, pki: PKI) -> None:
    assert request(tls_server, pki, auth="alice:wrong")[0] == 401
    assert request(tls_server, pki, auth="mallory:s3cret")[0] == 401
    assert request(tls_server, pki, auth=None)[0] == 401


@pytest.mark.parametrize("client", [None, "stranger"])
def test_client_without_a_trusted_certificate_is_refused(
    tls_server: MetricsHTTPServer, pki: PKI, client: str | None
) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException, OSError)):
        request(tls_server, pki, client=client, auth="alice:s3cret")


def test_plain_http_is_refused_when_tls_is_on(tls_server: MetricsHTTPServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", tls_server.port, timeout=5)
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        conn.request("GET", "/metrics")
        conn.getresponse()


def test_basic_auth_alone_over_http(tmp_path: Path) -> None:
    password = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  bob: '{password}'\n")
    server = serve(load_web_config(config))
    try:
        for auth, status in ((None, 401), ("bob:nope", 401), ("bob:pw", 200)):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
            headers = {}
            if auth:
                headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
            conn.request("GET", "/healthz", headers=headers)
            assert conn.getresponse().status == status
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("tls_server_config: {cert_file: nope.crt, key_file: nope.key}", "no such file"),
        ("tls_server_config: {cert_file: a, key_file: b, colour: red}", "unknown key"),
        ("basic_auth_users: {alice: plaintext}", "bcrypt"),
        ("tls_server_config:\n  client_auth_type: RequireAnyClientCert", "not one of"),
        ("tlz_server_config: {}", "unknown key"),
        ("[1, 2]", "mapping"),
    ],
)
def test_bad_web_config_is_a_one_line_start_up_error(
    tmp_path: Path, text: str, needle: str
) -> None:
    config = tmp_path / "web.yml"
    config.write_text(text + "\n")
    with pytest.raises(WebConfigError, match=needle):
        load_web_config(config)
    with pytest.raises(ConfigError) as info:
        load(["--web.config.file", str(config)], environ={})
    assert "--web.config.file" in str(info.value) and "\n" not in str(info.value)
