"""The ZAP handler that lets only allowed publishers through to ``curve.allow=`` sources.

libzmq asks a ZAP handler (RFC 27) about every client that completes a CURVE handshake with a
server socket; without one, these sockets (ZAP_ENFORCE_DOMAIN) refuse every client. pyzmq's
:class:`~zmq.auth.thread.ThreadAuthenticator` is that handler, on its own thread; each
source is its own ZAP domain, with the keys read from its ``curve.allow`` directory at start.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from ..curve import CurveRole

log = logging.getLogger("kvcache_exporter.source.zap")


class _AllowedKeys:
    """A credentials provider for pyzmq's authenticator: a fixed set of Z85 public keys."""

    def __init__(self, keys: frozenset[bytes]) -> None:
        self._keys = keys

    def callback(self, domain: str, client_key: bytes) -> bool:
        allowed = client_key in self._keys
        if not allowed:
            log.debug("publisher key refused", extra={"source": domain, "key": client_key.decode()})
        return allowed


class PublisherAuthenticator:
    """Started for the server roles among ``roles`` (by source name); a no-op without any."""

    def __init__(self, context: zmq.Context[Any], roles: Mapping[str, CurveRole]) -> None:
        self._allowed = {
            role.zap_domain: role.allowed_keys for role in roles.values() if role.is_server
        }
        self._handler: ThreadAuthenticator | None = None
        if self._allowed:
            self._handler = ThreadAuthenticator(context, log=log)

    def start(self) -> None:
        """Serve ZAP; call before the sources bind or connect."""
        if self._handler is None:
            return
        self._handler.start()
        for domain, keys in self._allowed.items():
            self._handler.configure_curve_callback(domain, credentials_provider=_AllowedKeys(keys))

    def stop(self) -> None:
        """Stop serving; call after the sources' sockets are closed, before the context ends."""
        if self._handler is not None:
            self._handler.stop()
