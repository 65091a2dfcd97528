# syntax=docker/dockerfile:1
#
# Production image of the call-status service.
#
#   docker build -t callstatus:0.1.0 .
#   docker run --rm -p 8080:8080 \
#     -e CALLSTATUS_KAFKA_BOOTSTRAP_SERVERS=kafka:9092 \
#     -e CALLSTATUS_SIGNING_SECRETS=... callstatus:0.1.0
#
# Two stages: `build` compiles the hot path's modules to C extensions (mypyc; setup.py
# lists them) and installs the project and its dependencies into a virtualenv at
# /opt/venv; `runtime` copies only that virtualenv onto a clean slim image, so no
# compiler, build tools, sources, pip caches or build artefacts reach the final image.
# Both stages MUST use the same base image: the venv's interpreter is a symlink to the
# base image's python3.11 (/usr/local/bin in the official image).
#
# BASE_IMAGE: any Debian bookworm image with Python 3.11 (`python` on PATH, the venv
# module, groupadd/useradd). The default is the official slim image; `make image-test`
# passes a base made locally from Debian's packages (tests/image/), because image
# registries cannot be reached on the project's machines.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# mypyc's C compiler, and Python's headers where the base lacks them (the official image
# has them in /usr/local/include; a base of Debian's python3 needs python3-dev). This
# stage only. Versions: the base's Debian release, like the rest of its packages.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
    && if [ ! -f "$(python -c 'import sysconfig; print(sysconfig.get_path("include"))')/Python.h" ]; then \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-dev; \
    fi \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"

WORKDIR /src
# The pinned dependency sets first (requirements.lock and requirements-build.lock,
# `make lock`), in layers of their own: a change to the sources alone rebuilds from the
# next COPY on and reuses them. The compiler (mypy, setuptools) gets a venv of its own,
# /opt/build, which never reaches the runtime stage.
COPY requirements.lock requirements-build.lock ./
RUN pip install --no-cache-dir -r requirements.lock
# mypy type-checks what it compiles, so the runtime set is in there too.
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir -r requirements.lock -r requirements-build.lock

# .dockerignore lets in only what the package build needs (pyproject.toml, setup.py,
# README, service/, schemas/, the two locks).
COPY . .

# The wheel is built compiled (CALLSTATUS_COMPILE=1, by /opt/build's mypyc, without
# pip's build isolation, so the pinned compiler is the one used), then installed with
# `--no-deps`, so nothing unpinned gets in. pip compiles .pyc files at install time, so
# the read-only runtime never needs to. The last check fails the build if the hot path
# came out as plain Python after all (`-P`: the installed package, not /src's sources).
RUN CALLSTATUS_COMPILE=1 /opt/build/bin/pip wheel --no-cache-dir --no-build-isolation \
        --no-deps --wheel-dir /tmp/wheels . \
    && pip install --no-cache-dir --no-deps /tmp/wheels/callstatus-*.whl \
    && pip check \
    && python -P -c "import schemas, service.server as s; assert s.COMPILED, 'not compiled'"


FROM ${BASE_IMAGE} AS runtime

LABEL org.opencontainers.image.title="callstatus" \
      org.opencontainers.image.description="FreeClimb call-status processor: signed webhooks in, an exactly-once stream of call-state changes out, on Apache Kafka" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid/gid: Kubernetes' runAsNonRoot can only verify a numeric USER,
# and deploy/k8s sets runAsUser/runAsGroup 10001 to match.
RUN groupadd --system --gid 10001 callstatus \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin callstatus \
    && mkdir -p /var/lib/callstatus/spool \
    && chown -R 10001:10001 /var/lib/callstatus

COPY --from=build /opt/venv /opt/venv

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CALLSTATUS_HOST=0.0.0.0 \
    CALLSTATUS_PORT=8080 \
    CALLSTATUS_SPOOL_DIR=/var/lib/callstatus/spool

# The ingest spool (events Kafka could not take yet) must stay writable under a
# read-only root filesystem: a volume, owned by the runtime user. `docker run` and
# compose make one here; Kubernetes mounts its own (deploy/k8s). The service's default
# (./.callstatus-spool) would be inside the read-only /app.
VOLUME ["/var/lib/callstatus/spool"]

# An empty working directory: settings also read ./.callstatus.env (local play only),
# which must never be found inside the image.
WORKDIR /app
USER 10001:10001

EXPOSE 8080

# Used by `docker run`/compose; Kubernetes ignores it and uses the probes in deploy/k8s.
HEALTHCHECK --interval=30s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CALLSTATUS_PORT', '8080'), timeout=2)"]

# Exec form: the Python process is PID 1 and receives SIGTERM directly, so it can drain
# for CALLSTATUS_SHUTDOWN_GRACE_SECONDS before exiting.
ENTRYPOINT ["callstatus"]
CMD ["serve"]
