# syntax=docker/dockerfile:1
#
# Production image of the call-status service.
#
#   docker build -t callstatus:0.1.0 .
#   docker run --rm -p 8080:8080 \
#     -e CALLSTATUS_KAFKA_BOOTSTRAP_SERVERS=kafka:9092 \
#     -e CALLSTATUS_SIGNING_SECRETS=... callstatus:0.1.0
#
# Two stages: `build` installs the project and its dependencies into a virtualenv at
# /opt/venv; `runtime` copies only that virtualenv onto a clean slim image, so no
# build tools, sources, pip caches or build artefacts reach the final image.
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

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"

WORKDIR /src
# The pinned dependency set first (requirements.lock, `make lock`), in a layer of its
# own: a change to the sources alone rebuilds from the next COPY on and reuses it.
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock

# .dockerignore lets in only what the package build needs (pyproject.toml, README,
# service/, schemas/, requirements.lock).
COPY . .

# `pip install --no-deps .` adds only the project, so nothing unpinned gets in.
# pip compiles .pyc files at install time, so the read-only runtime never needs to.
RUN pip install --no-cache-dir --no-deps . \
    && pip check \
    && python -c "import service, schemas"


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
