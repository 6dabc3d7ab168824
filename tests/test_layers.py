"""The package's layers (docs/architecture.md): what an import loads, and the import-linter
contracts of pyproject.toml, shown to fail on a backwards import."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kvcache_exporter

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "exporter" / "kvcache_exporter"


def loaded_by(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``statement``."""
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(result.stdout.splitlines()[-1]))


def top(modules: set[str], name: str) -> set[str]:
    return {m for m in modules if m == name or m.startswith(name + ".")}


def test_the_wire_format_loads_no_zeromq() -> None:
    modules = loaded_by("import kvcache_exporter.protocol.decode")
    assert not top(modules, "zmq")


def test_the_library_loads_neither_zeromq_nor_the_simulator() -> None:
    modules = loaded_by("import kvcache_exporter.library")
    assert not top(modules, "zmq")
    assert not top(modules, "kvcache_exporter.engine")
    assert "kvcache_exporter.publisher" not in modules


def test_the_package_loads_none_of_its_submodules() -> None:
    modules = loaded_by("import kvcache_exporter")
    assert top(modules, "kvcache_exporter") == {"kvcache_exporter"}


def test_the_seed_names_load_on_first_use() -> None:
    modules = loaded_by("from kvcache_exporter import create_metrics_collector")
    assert "kvcache_exporter.library" in modules
    for name in kvcache_exporter.__all__:
        assert getattr(kvcache_exporter, name) is not None
        assert name in dir(kvcache_exporter)
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = kvcache_exporter.no_such_name


def test_every_subpackage_is_a_regular_package() -> None:
    """import-linter (grimp) skips folders without ``__init__.py``: a layer missing one is not
    checked at all (lint-imports then says "Missing layer ... does not exist")."""
    missing = sorted(
        str(folder.relative_to(PACKAGE))
        for folder in PACKAGE.rglob("*")
        if folder.is_dir()
        and folder.name != "__pycache__"
        and any(folder.glob("*.py"))
        and not (folder / "__init__.py").exists()
    )
    assert not missing, f"no __init__.py in {missing}"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` over the package copied to ``root``, with the project's contracts."""
    script = Path(sys.executable).with_name("lint-imports")
    command = str(script) if script.exists() else shutil.which("lint-imports")
    assert command, "lint-imports not installed (pip install -e '.[test]')"
    return subprocess.run(
        [command, "--no-cache"],
        cwd=root,  # pyproject.toml is read from here
        env={**os.environ, "PYTHONPATH": str(root / "exporter")},  # the copy comes first
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def copy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("layers")
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    shutil.copytree(
        PACKAGE,
        root / "exporter" / "kvcache_exporter",
        ignore=shutil.ignore_patterns("__pycache__", "data"),
    )
    # The contracts' mechanics, whatever test_every_subpackage_is_a_regular_package says.
    for folder in (root / "exporter" / "kvcache_exporter").iterdir():
        if folder.is_dir() and any(folder.glob("*.py")):
            (folder / "__init__.py").touch(exist_ok=True)
    return root


def test_the_contracts_hold_on_the_package(copy_root: Path) -> None:
    result = lint_imports(copy_root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "reported"),
    [
        # a lower layer importing a higher one
        (
            "protocol/batch.py",
            "from ..sinks import http",
            "kvcache_exporter.protocol.batch -> kvcache_exporter.sinks.http",
        ),
        # two independent siblings
        (
            "publisher.py",
            "from .sources import stream",
            "kvcache_exporter.publisher -> kvcache_exporter.sources.stream",
        ),
        # sockets in the wire format
        ("protocol/decode.py", "import zmq", "kvcache_exporter.protocol.decode -> zmq"),
        # reading flags loading the pipeline (allowed by the layers, not by this contract)
        (
            "config/checks.py",
            "from .. import checkpoint",
            "kvcache_exporter.config.checks -> kvcache_exporter.checkpoint",
        ),
    ],
)
def test_a_backwards_import_breaks_a_contract(
    copy_root: Path, tmp_path: Path, module: str, line: str, reported: str
) -> None:
    root = tmp_path / "broken"
    shutil.copytree(copy_root, root)
    target = root / "exporter" / "kvcache_exporter" / module
    target.write_text(target.read_text() + f"\n{line}  # noqa: E402, F401\n")
    result = lint_imports(root)
    assert result.returncode != 0, result.stdout
    assert "1 broken" in result.stdout
    assert reported in result.stdout


def test_the_public_publisher_module_keeps_its_names() -> None:
    """docs/protocol.md and docs/security.md import these from ``kvcache_exporter.publisher``;
    the encoding ones are the wire format's own objects."""
    from kvcache_exporter import publisher
    from kvcache_exporter.protocol import encode

    documented = {"KVEventPublisher", "WireForm", "encode_batch", "frames", "load_key_pair"}
    documented |= {"load_public_key", "Stored", "Removed", "Accessed", "Cleared"}
    assert documented <= set(publisher.__all__)
    for name in set(encode.__all__) & set(publisher.__all__):
        assert getattr(publisher, name) is getattr(encode, name)
