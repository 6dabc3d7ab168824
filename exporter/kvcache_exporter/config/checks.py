"""Start-up work that reads or writes files: proving ``--storage.path`` writable, and building
each CURVE source's role from its key files (with libzmq's CURVE support checked first).

It runs while the configuration loads, so that a bad path or key stops the exporter with one
line and exit code 2 instead of failing later in a pipeline or silencing a source.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..curve import (
    CurveKeyError,
    CurveRole,
    client_role,
    curve_available,
    load_allowed_keys,
    load_key_pair,
    load_public_key,
    server_role,
)
from ..sources.spec import SourceSpec
from .settings import ConfigError


def check_writable(directory: Path) -> None:
    """Create ``--storage.path`` if needed and prove a file can be written there (OSError if
    not). Here, not in checkpoint.py, so that reading flags does not load the pipeline."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
        pass


def curve_roles(sources: Sequence[SourceSpec], key_file: str | None) -> dict[str, CurveRole]:
    """The exporter's CURVE role per source that asks for one, with every key file read and
    checked now, so that a bad one stops the start-up instead of silencing a source."""
    curve_sources = [spec for spec in sources if spec.uses_curve]
    if not curve_sources:
        if key_file is not None:
            raise ConfigError(
                f"--source.curve.key-file {key_file}: no source uses CURVE "
                "(add curve.engine-key= or curve.allow= to a --source)"
            )
        return {}
    if not curve_available():
        raise ConfigError(
            f"source {curve_sources[0].name}: this libzmq was built without CURVE support"
        )
    if key_file is None:
        raise ConfigError(
            f"source {curve_sources[0].name}: CURVE needs the exporter's own key pair "
            "(--source.curve.key-file NAME.key_secret; make one with 'kvcache-exporter keygen')"
        )
    try:
        _, secret = load_key_pair(key_file)
    except CurveKeyError as exc:
        raise ConfigError(f"--source.curve.key-file {exc}") from None
    roles = {}
    for spec in curve_sources:
        try:
            if spec.curve_engine_key is not None:
                roles[spec.name] = client_role(secret, load_public_key(spec.curve_engine_key))
            else:
                assert spec.curve_allow is not None
                allowed = load_allowed_keys(spec.curve_allow)
                roles[spec.name] = server_role(secret, spec.name, allowed)
        except CurveKeyError as exc:
            option = "curve.engine-key" if spec.curve_engine_key else "curve.allow"
            raise ConfigError(f"source {spec.name}: {option} {exc}") from None
    return roles
