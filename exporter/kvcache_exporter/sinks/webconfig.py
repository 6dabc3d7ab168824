"""``--web.config.file``: TLS and basic auth in the Prometheus exporter-toolkit format.

    tls_server_config:
      cert_file: server.crt
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # or NoClientCert (default), …
      client_ca_file: ca.crt
      min_version: TLS12                            # TLS10 … TLS13
    basic_auth_users:
      alice: $2y$10$…                               # bcrypt hashes (htpasswd -nBC 10)

Relative paths are relative to the file. Both parts are optional; what is given applies to
every HTTP endpoint, health and readiness included, as in the exporter-toolkit.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import bcrypt
import yaml

# exporter-toolkit's RequestClientCert and RequireAnyClientCert accept certificates nobody
# verifies; Python's TLS verifies every client certificate it asks for, so those two are
# refused rather than quietly made stricter or looser.
CLIENT_AUTH_TYPES: Final = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
TLS_VERSIONS: Final = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_TLS_KEYS: Final = frozenset(
    {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version"}
)


class WebConfigError(ValueError):
    """A web config file that cannot be used; the message says where and why."""


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert_file: Path
    key_file: Path
    client_auth_type: str = "NoClientCert"
    client_ca_file: Path | None = None
    min_version: str = "TLS12"
    max_version: str | None = None

    def context(self) -> ssl.SSLContext:
        """The server's SSL context (raises WebConfigError on unreadable files)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = TLS_VERSIONS[self.min_version]
        if self.max_version is not None:
            ctx.maximum_version = TLS_VERSIONS[self.max_version]
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
            if self.client_ca_file is not None:
                ctx.load_verify_locations(cafile=self.client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise WebConfigError(f"tls_server_config: {exc}") from None
        ctx.verify_mode = CLIENT_AUTH_TYPES[self.client_auth_type]
        return ctx


@dataclass(slots=True)
class BasicAuth:
    """Checks ``Authorization: Basic`` headers against bcrypt hashes.

    bcrypt is slow by design (tens of ms at cost 10); a successful check is remembered, keyed by
    a keyed hash of the presented credentials, so a scraper does not pay it on every request.
    """

    users: dict[str, bytes]
    _verified: set[bytes] = field(default_factory=set)
    _key: bytes = field(default_factory=lambda: os.urandom(32))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _credentials(self, header: str | None) -> tuple[bytes, str, bytes] | None:
        """(remembering token, password, bcrypt hash) for a Basic header naming a known
        user, else None."""
        if not header or not header.startswith("Basic "):
            return None
        try:
            decoded = base64.b64decode(header[6:], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        expected = self.users.get(user)
        if not sep or expected is None:
            return None
        token = hmac.new(self._key, decoded.encode(), hashlib.sha256).digest()
        return token, password, expected

    def remembered(self, header: str | None) -> bool | None:
        """What is known without bcrypt: True for credentials that passed before, False for
        a header that cannot pass (not Basic, unknown user), None when only :meth:`check`
        can tell."""
        credentials = self._credentials(header)
        if credentials is None:
            return False
        with self._lock:
            return True if credentials[0] in self._verified else None

    def check(self, header: str | None) -> bool:
        credentials = self._credentials(header)
        if credentials is None:
            return False
        token, password, expected = credentials
        with self._lock:
            if token in self._verified:
                return True
        try:
            ok = bool(bcrypt.checkpw(password.encode(), expected))
        except ValueError:
            return False
        if ok:
            with self._lock:
                if len(self._verified) > 1024:
                    self._verified.clear()
                self._verified.add(token)
        return ok


@dataclass(frozen=True, slots=True)
class WebConfig:
    tls: TLSConfig | None = None
    basic_auth: BasicAuth | None = None


def _path(base: Path, value: object, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise WebConfigError(f"tls_server_config.{key}: expected a file path")
    path = Path(value)
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise WebConfigError(f"tls_server_config.{key}: no such file: {path}")
    return path


def _tls(raw: object, base: Path) -> TLSConfig | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise WebConfigError("tls_server_config: expected a mapping")
    unknown = sorted(set(map(str, raw)) - _TLS_KEYS)
    if unknown:
        raise WebConfigError(f"tls_server_config: unknown key {unknown[0]!r}")
    auth = raw.get("client_auth_type", "NoClientCert")
    if auth not in CLIENT_AUTH_TYPES:
        raise WebConfigError(
            f"tls_server_config.client_auth_type: {auth!r} is not one of "
            + ", ".join(CLIENT_AUTH_TYPES)
        )
    versions = {}
    for key, default in (("min_version", "TLS12"), ("max_version", None)):
        value = raw.get(key, default)
        if value is not None and value not in TLS_VERSIONS:
            raise WebConfigError(f"tls_server_config.{key}: {value!r} is not one of TLS10..TLS13")
        versions[key] = value
    ca = raw.get("client_ca_file")
    if auth in ("RequireAndVerifyClientCert", "VerifyClientCertIfGiven") and not ca:
        raise WebConfigError(f"tls_server_config: client_auth_type {auth} needs client_ca_file")
    return TLSConfig(
        cert_file=_path(base, raw.get("cert_file"), "cert_file"),
        key_file=_path(base, raw.get("key_file"), "key_file"),
        client_auth_type=auth,
        client_ca_file=_path(base, ca, "client_ca_file") if ca else None,
        min_version=versions["min_version"] or "TLS12",
        max_version=versions["max_version"],
    )


def _users(raw: object) -> BasicAuth | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw:
        raise WebConfigError("basic_auth_users: expected a mapping of user to bcrypt hash")
    users = {}
    for user, hashed in raw.items():
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise WebConfigError(f"basic_auth_users.{user}: expected a bcrypt hash ($2y$…)")
        users[str(user)] = hashed.encode()
    return BasicAuth(users)


def load_web_config(path: str | Path) -> WebConfig:
    """Read and check a web config file; raises WebConfigError with a one-line reason."""
    file = Path(path)
    try:
        data: Any = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise WebConfigError(str(exc.strerror or exc)) from None
    except yaml.YAMLError:
        raise WebConfigError("not valid YAML") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise WebConfigError("expected a mapping")
    known = {"tls_server_config", "basic_auth_users", "http_server_config"}
    unknown = sorted(set(map(str, data)) - known)
    if unknown:
        raise WebConfigError(f"unknown key {unknown[0]!r}")
    config = WebConfig(
        tls=_tls(data.get("tls_server_config"), file.parent),
        basic_auth=_users(data.get("basic_auth_users")),
    )
    if config.tls is not None:
        config.tls.context()  # unreadable certificates are a start-up error, not a runtime one
    return config
