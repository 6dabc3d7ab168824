"""ZeroMQ CURVE keys and socket roles, shared by the exporter's sources and the publisher.

Keys are Z85 text (40 characters) in ZeroMQ certificate files, the format of czmq's
``zcert`` and pyzmq's ``zmq.auth.create_certificates``: ``NAME.key`` holds the public key,
``NAME.key_secret`` the public and the secret key. The side that holds its secret key and
checks the other is the CURVE *server*; the side that knows the server's public key is the
*client*. Either side may bind or connect.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.utils import z85

KEY_LENGTH = 40  # Z85 text of a 32-byte key


class CurveKeyError(ValueError):
    """A key file that cannot be used; the message says why in one line."""


def curve_available() -> bool:
    """Whether the libzmq under pyzmq was built with CURVE (libsodium or tweetnacl)."""
    return bool(zmq.has("curve"))


def _check_key(key: bytes | None, what: str, path: Path) -> bytes:
    if key is None:
        raise CurveKeyError(f"{path}: no {what} (expected a line '{what} = \"<40 Z85 chars>\"')")
    try:
        valid = len(key) == KEY_LENGTH and len(z85.decode(key)) == 32
    except Exception:  # z85.decode raises what it meets: KeyError, struct.error, ...
        valid = False
    if not valid:
        raise CurveKeyError(f"{path}: the {what} is not a {KEY_LENGTH}-character Z85 key")
    return key


def _read_certificate(path: Path) -> tuple[bytes | None, bytes | None]:
    if not path.is_file():
        raise CurveKeyError(f"{path}: no such file")
    try:
        return zmq.auth.load_certificate(path)
    except OSError as exc:
        raise CurveKeyError(f"{path}: {exc.strerror or exc}") from None
    except ValueError:
        raise CurveKeyError(f"{path}: no public-key line; not a ZeroMQ certificate") from None


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """The public key in a certificate file (a ``.key`` or a ``.key_secret`` file)."""
    path = Path(path)
    public, _ = _read_certificate(path)
    return _check_key(public, "public-key", path)


def load_key_pair(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) from a secret certificate file; both must be there and belong
    together."""
    path = Path(path)
    public, secret = _read_certificate(path)
    public = _check_key(public, "public-key", path)
    secret = _check_key(secret, "secret-key", path)
    if zmq.curve_public(secret) != public:
        raise CurveKeyError(f"{path}: the public-key does not belong to the secret-key")
    return public, secret


def load_allowed_keys(directory: str | os.PathLike[str]) -> frozenset[bytes]:
    """Every public key in ``directory/*.key`` (czmq's layout); at least one."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CurveKeyError(f"{directory}: no such directory")
    keys = frozenset(load_public_key(path) for path in sorted(directory.glob("*.key")))
    if not keys:
        raise CurveKeyError(f"{directory}: no public keys (*.key files)")
    return keys


@dataclass(frozen=True, slots=True)
class CurveRole:
    """One side of a CURVE handshake: this side's key pair, and either the server's public key
    (this side is the client) or, for the server, the clients it lets in: ``allowed_keys``
    under the ZAP domain ``zap_domain``, which a ZAP handler must serve (a server without a
    domain lets in every client that knows its public key)."""

    public_key: bytes
    secret_key: bytes
    server_key: bytes | None = None
    zap_domain: str = ""
    allowed_keys: frozenset[bytes] = frozenset()

    @property
    def is_server(self) -> bool:
        return self.server_key is None

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Set the socket's CURVE options; call before it binds or connects."""
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public_key)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret_key)
        if self.server_key is None:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            if self.zap_domain:
                sock.setsockopt(zmq.ZAP_DOMAIN, self.zap_domain.encode())
                # Refuse every client while no ZAP handler answers, instead of letting in
                # anyone who knows the server's public key.
                sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        else:
            sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_key)


def server_role(
    secret_key: bytes, zap_domain: str = "", allowed_keys: frozenset[bytes] = frozenset()
) -> CurveRole:
    """The server side from its secret key (the public key follows from it)."""
    return CurveRole(
        zmq.curve_public(secret_key),
        secret_key,
        zap_domain=zap_domain,
        allowed_keys=allowed_keys,
    )


def client_role(secret_key: bytes, server_key: bytes) -> CurveRole:
    """The client side: its own secret key and the server's public key."""
    return CurveRole(zmq.curve_public(secret_key), secret_key, server_key=server_key)
