"""The compiled decode stage (``kvcache_exporter.protocol._wire``), built where a C compiler is.

Everything else is in pyproject.toml. The extension is optional: without a compiler the build
goes on and the exporter decodes with the msgspec reference (``protocol/compiled.py``).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kvcache_exporter.protocol._wire",
            ["exporter/kvcache_exporter/protocol/_wire.c"],
            extra_compile_args=["-O3", "-std=c11"],
            optional=True,
        )
    ]
)
