#!/usr/bin/env bash
# Build the GMC-O images (make images): with docker where a Docker daemon answers, else with buildah.
#
#   scripts/build-images.sh                      # every image: router cache ontology rl_state shard shard-gpu
#   scripts/build-images.sh router shard         # some of them
#
# Images are tagged gmco/<name>:$TAG (the chart's image.repository; rl_state is gmco/rl-state), the GPU
# shard gmco/shard:$TAG-gpu. buildah names them localhost/gmco/<name>:$TAG.
#
# Environment:
#   TAG            image tag (default: dev)
#   REGISTRY       prefix for the tags, e.g. registry.example.com (then push them yourself)
#   IMAGE_BASE     "default": the Dockerfiles' base images (python:3.11-slim-bookworm, pulled);
#                  "debian": local Debian bookworm bases made with debootstrap (scripts/debian-base.sh),
#                  for machines that reach Debian and PyPI but no container registry.
#                  Default: "default" with docker, "debian" with buildah.
#   ENGINE         docker or buildah (default: docker if `docker info` works, else buildah)
#   GMCO_STORAGE_DRIVER   buildah's storage driver (default: vfs, which works in any container)
#   BUILDAH_LAYERS 1: buildah caches every step (--layers); worth it only on a copy-on-write storage driver
#   BUILD_CA_FILE  a CA bundle the build stages' pip and uv trust, handed in as a build secret (never in a
#                  layer); default: the host's SSL_CERT_FILE when set (a TLS-intercepting proxy's CA)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TAG="${TAG:-dev}"
ALL=(router cache ontology rl_state shard shard-gpu)
images=("$@")
[ ${#images[@]} -gt 0 ] || images=("${ALL[@]}")

if [ -z "${ENGINE:-}" ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then ENGINE=docker; else ENGINE=buildah; fi
fi
case "$ENGINE" in
  docker) BUILD=(docker build) ;;
  buildah)
    command -v buildah >/dev/null || { echo "build-images: no Docker daemon and no buildah (make system installs it)" >&2; exit 1; }
    # chroot isolation and the host network: what works inside an unprivileged CI container. No
    # --layers by default: on vfs (no copy-on-write) every cached step is a full copy of the file system,
    # and a change anywhere in the code invalidates all but the first steps anyway; without it a stage
    # is one container, committed once (the router: about 1 minute instead of 2.5 here).
    BUILDAH=(buildah --storage-driver "${GMCO_STORAGE_DRIVER:-vfs}")
    BUILD=("${BUILDAH[@]}" bud --isolation chroot --network host --format docker)
    if [ "${BUILDAH_LAYERS:-0}" = 1 ]; then BUILD+=(--layers); fi ;;
  *) echo "build-images: ENGINE must be docker or buildah, not $ENGINE" >&2; exit 1 ;;
esac
IMAGE_BASE="${IMAGE_BASE:-$([ "$ENGINE" = docker ] && echo default || echo debian)}"
base_args=()
case "$IMAGE_BASE" in
  default) ;;
  debian)
    bash "$ROOT/scripts/debian-base.sh"
    base_args=(--build-arg PYTHON_IMAGE=localhost/gmco-debian:bookworm
               --build-arg BUILD_IMAGE=localhost/gmco-debian-build:bookworm) ;;
  *) echo "build-images: IMAGE_BASE must be default or debian, not $IMAGE_BASE" >&2; exit 1 ;;
esac

# name -> "<Dockerfile> <build args...>"; the ports are the services' defaults (the image checks them).
declare -A SPEC=(
  [router]="deploy/images/service.Dockerfile --build-arg SERVICE=router --build-arg PORT=50050"
  [cache]="deploy/images/service.Dockerfile --build-arg SERVICE=cache --build-arg PORT=50052"
  [ontology]="deploy/images/service.Dockerfile --build-arg SERVICE=ontology --build-arg PORT=50053"
  [rl_state]="deploy/images/service.Dockerfile --build-arg SERVICE=rl_state --build-arg PORT=50054"
  [shard]="deploy/images/shard.Dockerfile --target cpu"
  [shard-gpu]="deploy/images/shard.Dockerfile --target gpu"
)
ca="${BUILD_CA_FILE:-${SSL_CERT_FILE:-}}"
if [ -n "$ca" ] && [ -r "$ca" ]; then
  base_args+=(--secret "id=ca-certificates,src=$ca")
fi
prefix="${REGISTRY:+$REGISTRY/}gmco"
for image in "${images[@]}"; do
  [ -n "${SPEC[$image]:-}" ] || { echo "build-images: no image '$image' (one of: ${ALL[*]})" >&2; exit 1; }
  read -r dockerfile args <<<"${SPEC[$image]}"
  case "$image" in
    shard-gpu) ref="$prefix/shard:$TAG-gpu" ;;
    *) ref="$prefix/${image//_/-}:$TAG" ;;
  esac
  echo "build-images: $ref ($ENGINE, $IMAGE_BASE base)"
  start=$SECONDS
  previous=""
  if [ "$ENGINE" = buildah ]; then
    previous="$("${BUILDAH[@]}" images --quiet --no-trunc "$ref" 2>/dev/null || true)"
  fi
  # shellcheck disable=SC2086  # args is a list of flags
  "${BUILD[@]}" -f "$dockerfile" $args "${base_args[@]}" -t "$ref" .
  # The image this one replaces lost its tag: remove it (unless a container still uses it), so that
  # rebuilding on vfs does not leave a full copy of the file system behind each time.
  if [ -n "$previous" ]; then
    current="$("${BUILDAH[@]}" images --quiet --no-trunc "$ref" 2>/dev/null || true)"
    if [ "$previous" != "$current" ]; then
      "${BUILDAH[@]}" rmi "$previous" >/dev/null 2>&1 || true
    fi
  fi
  echo "build-images: $ref built in $((SECONDS - start)) s"
done
