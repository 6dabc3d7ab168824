"""Optional compiled extensions; the metadata is in pyproject.toml.

- ``kvcache_exporter.protocol._wire`` (C): the decode stage, msgpack payloads to columns;
- ``kvcache_exporter.collector._table`` (Cython): the block table's probe and insert;
- ``kvcache_exporter.collector._apply`` (Cython): the collector's apply of a batch, row by row;
- ``kvcache_exporter.analysis.whatif._chunk`` (Cython): the what-if model's ranks and distances.

Each has a reference beside it (msgspec, numpy), so an install without a C compiler, or
without Cython, still works: a failed build is reported and skipped, never fatal.
"""

from __future__ import annotations

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

WIRE = Extension(
    "kvcache_exporter.protocol._wire",
    ["exporter/kvcache_exporter/protocol/_wire.c"],
    extra_compile_args=["-O3", "-std=c11"],
)
TABLE = Extension(
    "kvcache_exporter.collector._table", ["exporter/kvcache_exporter/collector/_table.pyx"]
)
CHUNK = Extension(
    "kvcache_exporter.analysis.whatif._chunk",
    ["exporter/kvcache_exporter/analysis/whatif/_chunk.pyx"],
    extra_compile_args=["-O3"],
)
APPLY = Extension(
    "kvcache_exporter.collector._apply",
    ["exporter/kvcache_exporter/collector/_apply.pyx"],
    extra_compile_args=["-O3"],
)


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing when an extension cannot be compiled."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler at all
            self._skip("all extensions", exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # this one failed to compile
            self._skip(ext.name, exc)

    @staticmethod
    def _skip(what: str, exc: Exception) -> None:
        print(
            f"WARNING: not compiling {what} ({exc}); its reference is used instead",
            file=sys.stderr,
        )


def _extensions() -> list[Extension]:
    try:
        from Cython.Build import cythonize
    except ImportError:  # Cython is a build requirement; without it, only the C extension
        print("WARNING: Cython not found; building without the compiled collector", file=sys.stderr)
        return [WIRE]
    compiled = cythonize(
        [TABLE, APPLY, CHUNK], compiler_directives={"language_level": "3"}, quiet=True
    )
    return [WIRE, *compiled]


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
