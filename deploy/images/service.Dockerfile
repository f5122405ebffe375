# syntax=docker/dockerfile:1
# The image of one of the four CPU services, chosen by SERVICE: router, cache, ontology or rl_state
# (with PORT, its default gRPC port; the build checks the two agree). Build it from the repository root
# (make images, scripts/build-images.sh):
#   docker build -f deploy/images/service.Dockerfile --build-arg SERVICE=cache --build-arg PORT=50052 \
#       -t gmco/cache:dev .
# Without a registry, from the local Debian bases that scripts/debian-base.sh makes:
#   buildah bud --format docker --build-arg PYTHON_IMAGE=localhost/gmco-debian:bookworm \
#       --build-arg BUILD_IMAGE=localhost/gmco-debian-build:bookworm --build-arg SERVICE=cache ...
# The build stage installs uv from PyPI, generates the gRPC stubs (scripts/gen-protos.sh) and syncs only
# the service's workspace member and its dependencies from uv.lock, as wheels, with its `otlp` extra (the
# OTLP span exporter, for *_OTEL_EXPORTER=otlp). The runtime stage is the
# base plus that virtualenv, a numeric non-root user, and nothing to write outside /tmp, so the root
# filesystem can be mounted read-only.
# Few layers on purpose: buildah's vfs storage (the one that works in any container) copies the whole
# filesystem for every layer.

# Defaults a normal Docker user pulls. Both stages need the same CPython at the same path (the virtualenv
# links to it); BUILD_IMAGE needs a C compiler only for the shard (shard.Dockerfile).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG BUILD_IMAGE=python:3.11-slim-bookworm

FROM ${BUILD_IMAGE} AS build
ARG UV_VERSION=0.13.9
COPY deploy/images/build-deps.sh deploy/images/with-ca.sh /usr/local/bin/
RUN --mount=type=secret,id=ca-certificates --mount=type=cache,target=/root/.cache/pip \
    build-deps.sh && python3 -m venv /opt/uv && with-ca.sh /opt/uv/bin/pip install --quiet "uv==${UV_VERSION}"
ENV PATH=/opt/uv/bin:$PATH UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON_PREFERENCE=only-system UV_PROJECT_ENVIRONMENT=/app/.venv
# The context is what .dockerignore leaves: pyproject.toml, uv.lock, protos, libs, services,
# scripts/gen-protos.sh and deploy/images.
COPY . /src
WORKDIR /src
# SERVICE only from here on: docker caches the layers above once for the four images.
ARG SERVICE=router
RUN --mount=type=cache,target=/root/.cache/uv --mount=type=secret,id=ca-certificates \
    with-ca.sh scripts/gen-protos.sh \
    && with-ca.sh uv sync --frozen --no-dev --no-editable --package "gmco-$(echo "${SERVICE}" | tr _ -)" --extra otlp

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 gmco && useradd --system --uid 10001 --gid gmco --no-create-home gmco
# The settings first, the virtualenv last: only the last three steps change when the code does.
ARG SERVICE=router
ARG PORT=50050
ENV PATH=/app/.venv/bin:/app/bin:$PATH HOME=/tmp PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    GMCO_IMAGE_SERVICE=${SERVICE} GMCO_IMAGE_PORT=${PORT}
# /tmp is the one writable path (an emptyDir in the chart, --tmpfs with podman/docker --read-only), so
# relative state paths (rl_state's default .run/rl_state.sqlite3) land there.
WORKDIR /tmp
EXPOSE ${PORT} 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s CMD ["/app/bin/gmco-healthcheck"]
ENTRYPOINT ["/app/bin/gmco-service"]
USER 10001:10001
COPY deploy/images/gmco-service deploy/images/gmco-healthcheck /app/bin/
COPY --from=build /app/.venv /app/.venv
# The image checks itself: the console script exists and PORT is the service's default port.
RUN gmco-healthcheck --check-image
