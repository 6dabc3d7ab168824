# kvcache-exporter container image.
#   docker build -t kvcache-exporter:0.1.0 .
#   docker run --rm -p 9477:9477 kvcache-exporter:0.1.0 --source vllm=tcp://HOST:5557
# Two stages: the first builds wheels of the project (with its compiled decode stage, so it has a
# C compiler) and of every dependency with `pip wheel .` (the same resolution as the README's
# `pip install .`); the second installs exactly those wheels, offline, and keeps neither pip,
# the wheels nor a compiler. tests/test_deploy.py runs both install
# commands, as written here, on every CI run (no image can be built there) and lints this file
# with hadolint.
#
# The base is pinned by version; pin it by digest too where you build
# (python:3.12.12-slim-bookworm@sha256:...), which cannot be resolved offline here.
ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
# gcc for the compiled stages, protocol/_wire.c and collector/_table.pyx (Debian 12's
# versions; without them the wheel would quietly lack the extensions and the exporter say
# compiled="false").
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc=4:12.2.0-3 libc6-dev=2.36-9+deb12u14 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md setup.py ./
COPY exporter ./exporter
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="kvcache-exporter" \
      org.opencontainers.image.description="Prometheus and OTLP exporter for the KV cache of LLM inference engines" \
      org.opencontainers.image.licenses="Apache-2.0"
# Nothing is written at run time: no bytecode, no temp files, so a read-only root filesystem works.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir --no-index --find-links /wheels /wheels/kvcache_exporter-*.whl \
    && python -m pip uninstall --yes pip
# A numeric user, so that Kubernetes' runAsNonRoot can verify it without an /etc/passwd entry.
USER 65532:65532
EXPOSE 9477
ENTRYPOINT ["kvcache-exporter"]
CMD ["--web.listen-address=:9477"]
