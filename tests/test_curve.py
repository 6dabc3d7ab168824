"""CURVE key files and socket roles (curve.py): what is accepted, what is refused
and why, in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq
import zmq.auth

from kvcache_exporter.curve import (
    CurveKeyError,
    client_role,
    load_allowed_keys,
    load_key_pair,
    load_public_key,
    server_role,
)


@pytest.fixture
def certs(tmp_path: Path) -> tuple[Path, Path]:
    """(public, secret) certificate files made by pyzmq, as `keygen` makes them."""
    public, secret = zmq.auth.create_certificates(tmp_path, "engine")
    return Path(public), Path(secret)


def test_pyzmq_certificates_load(certs: tuple[Path, Path]) -> None:
    public_file, secret_file = certs
    public, secret = load_key_pair(secret_file)
    assert load_public_key(public_file) == public == zmq.curve_public(secret)
    assert load_public_key(secret_file) == public  # the secret file has the public key too
    assert len(public) == len(secret) == 40


def write(path: Path, public: str | None, secret: str | None = None) -> Path:
    lines = ["metadata", "curve"]
    if public is not None:
        lines.append(f'    public-key = "{public}"')
    if secret is not None:
        lines.append(f'    secret-key = "{secret}"')
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD_PUBLIC, GOOD_SECRET = (key.decode() for key in zmq.curve_keypair())
OTHER_PUBLIC = zmq.curve_keypair()[0].decode()


@pytest.mark.parametrize(
    ("public", "secret", "message"),
    [
        (None, None, "no public-key line; not a ZeroMQ certificate"),
        ("too-short", None, "the public-key is not a 40-character Z85 key"),
        ("~" * 40, None, "the public-key is not a 40-character Z85 key"),  # not Z85
        ("#" * 40, None, "the public-key is not a 40-character Z85 key"),  # Z85 beyond 2**32
        (GOOD_PUBLIC, None, "no secret-key (expected a line 'secret-key = \"<40 Z85 chars>\"')"),
        (GOOD_PUBLIC, "x" * 39, "the secret-key is not a 40-character Z85 key"),
        (OTHER_PUBLIC, GOOD_SECRET, "the public-key does not belong to the secret-key"),
    ],
)
def test_bad_secret_certificates_are_refused_with_the_reason(
    tmp_path: Path, public: str | None, secret: str | None, message: str
) -> None:
    path = write(tmp_path / "bad.key_secret", public, secret)
    with pytest.raises(CurveKeyError) as err:
        load_key_pair(path)
    assert str(err.value) == f"{path}: {message}"


def test_missing_files_and_folders(tmp_path: Path) -> None:
    with pytest.raises(CurveKeyError, match="no such file"):
        load_public_key(tmp_path / "absent.key")
    with pytest.raises(CurveKeyError, match="no such directory"):
        load_allowed_keys(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CurveKeyError, match=r"no public keys \(\*\.key files\)"):
        load_allowed_keys(tmp_path / "empty")


def test_allowed_keys_are_every_public_certificate_in_the_folder(tmp_path: Path) -> None:
    keys = {Path(zmq.auth.create_certificates(tmp_path, f"e{i}")[0]) for i in range(3)}
    # The secret files beside them are not read as extra keys: only *.key files count.
    assert load_allowed_keys(tmp_path) == {load_public_key(path) for path in keys}
    write(tmp_path / "broken.key", "not-a-key")
    with pytest.raises(CurveKeyError, match=r"broken\.key: the public-key is not"):
        load_allowed_keys(tmp_path)


def test_roles_set_the_socket_options() -> None:
    """(pyzmq cannot read CURVE keys back; that the keys work is tested over real sockets in
    test_sources_subscriber.py.)"""
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    context = zmq.Context()
    try:
        server = context.socket(zmq.SUB)
        role = server_role(server_secret, "engine-a", frozenset([client_public]))
        assert role.is_server and role.public_key == server_public
        role.apply(server)
        assert server.getsockopt(zmq.CURVE_SERVER) == 1
        assert server.getsockopt(zmq.ZAP_DOMAIN) == b"engine-a"
        client = context.socket(zmq.PUB)
        role = client_role(client_secret, server_public)
        assert not role.is_server and role.public_key == client_public
        assert role.server_key == server_public
        role.apply(client)
        assert client.getsockopt(zmq.CURVE_SERVER) == 0
    finally:
        context.destroy(linger=0)
