# syntax=docker/dockerfile:1
# The shard image, in two variants (build targets):
#   cpu  (the default, last stage)  the exact, ivf and hnsw index backends
#   gpu  (--target gpu)             plus the shard's `gpu` extra: cuVS/RMM/CuPy built for CUDA 13, whose
#                                   CUDA runtime libraries come as wheels (nvidia-*, cuda-toolkit, pinned
#                                   in uv.lock), so the base is the same CPython image as the CPU variant;
#                                   only the driver comes from the node (NVIDIA container toolkit).
# Build it from the repository root (make images, scripts/build-images.sh):
#   docker build -f deploy/images/shard.Dockerfile -t gmco/shard:dev .
#   docker build -f deploy/images/shard.Dockerfile --target gpu -t gmco/shard:dev-gpu .
# Without a registry, from the local Debian bases (scripts/debian-base.sh), as in service.Dockerfile.
# The build stage also compiles gmco-kernels (the C inner loops), so it needs gcc and the Python headers;
# the runtime stages have neither.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG BUILD_IMAGE=python:3.11-slim-bookworm

FROM ${BUILD_IMAGE} AS build
ARG UV_VERSION=0.13.9
COPY deploy/images/build-deps.sh deploy/images/with-ca.sh /usr/local/bin/
RUN --mount=type=secret,id=ca-certificates --mount=type=cache,target=/root/.cache/pip \
    build-deps.sh cc && python3 -m venv /opt/uv && with-ca.sh /opt/uv/bin/pip install --quiet "uv==${UV_VERSION}"
ENV PATH=/opt/uv/bin:$PATH UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON_PREFERENCE=only-system UV_PROJECT_ENVIRONMENT=/app/.venv
COPY . /src
WORKDIR /src

FROM build AS venv-cpu
RUN --mount=type=cache,target=/root/.cache/uv --mount=type=secret,id=ca-certificates \
    with-ca.sh scripts/gen-protos.sh && with-ca.sh uv sync --frozen --no-dev --no-editable --package gmco-shard --extra otlp

FROM build AS venv-gpu
RUN --mount=type=cache,target=/root/.cache/uv --mount=type=secret,id=ca-certificates \
    with-ca.sh scripts/gen-protos.sh \
    && with-ca.sh uv sync --frozen --no-dev --no-editable --package gmco-shard --extra gpu --extra otlp

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 gmco && useradd --system --uid 10001 --gid gmco --no-create-home gmco
ENV PATH=/app/.venv/bin:/app/bin:$PATH HOME=/tmp PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    GMCO_IMAGE_SERVICE=shard GMCO_IMAGE_PORT=50051
COPY deploy/images/gmco-service deploy/images/gmco-healthcheck /app/bin/
WORKDIR /tmp
EXPOSE 50051 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s CMD ["/app/bin/gmco-healthcheck"]
ENTRYPOINT ["/app/bin/gmco-service"]

# The user and settings before the virtualenv: only the last two steps change when the code does.
FROM runtime AS gpu
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
COPY --from=venv-gpu /app/.venv /app/.venv
RUN gmco-healthcheck --check-image

FROM runtime AS cpu
USER 10001:10001
COPY --from=venv-cpu /app/.venv /app/.venv
RUN gmco-healthcheck --check-image
