#!/usr/bin/env bash
# Make the two local Debian bookworm base images that the Dockerfiles can build from where no registry is
# reachable, from Debian's own packages (debootstrap) rather than from a pulled image:
#
#   localhost/gmco-debian:bookworm         minbase + python3 (3.11) + ca-certificates: the runtime stage
#   localhost/gmco-debian-build:bookworm   the above + gcc, libc6-dev, python3-dev, python3-venv: the build
#                                          stage (uv from PyPI needs a venv; gmco-kernels needs a C compiler)
#
# They stand in for the Dockerfiles' defaults (python:3.11-slim-bookworm for both stages):
#   buildah bud --build-arg PYTHON_IMAGE=localhost/gmco-debian:bookworm \
#               --build-arg BUILD_IMAGE=localhost/gmco-debian-build:bookworm ...
#
# The debootstrap'd root filesystem is cached as a tarball under .run/images/ (about 1 minute to make,
# seconds to import), so a CI run that keeps .run/ pays for debootstrap once. Idempotent: does nothing when
# both images are already in the container storage. Needs root (debootstrap, buildah with vfs).
#
# Environment: GMCO_DEBIAN_MIRROR (default: deb.debian.org), GMCO_STORAGE_DRIVER (default: vfs),
# BUILDAH (default: buildah).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.run/images"
MIRROR="${GMCO_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
RUNTIME_TAG="localhost/gmco-debian:$SUITE"
BUILD_TAG="localhost/gmco-debian-build:$SUITE"
TARBALL="$CACHE/debian-$SUITE-python3.tar"
BUILDAH=(${BUILDAH:-buildah} --storage-driver "${GMCO_STORAGE_DRIVER:-vfs}")

have() { "${BUILDAH[@]}" inspect --type image "$1" >/dev/null 2>&1; }

if have "$RUNTIME_TAG" && have "$BUILD_TAG"; then
  echo "debian-base: $RUNTIME_TAG and $BUILD_TAG are present"
  exit 0
fi
for tool in debootstrap "${BUILDAH[0]}"; do
  command -v "$tool" >/dev/null || { echo "debian-base: $tool is needed (make system installs it)" >&2; exit 1; }
done

if [ ! -s "$TARBALL" ]; then
  mkdir -p "$CACHE"
  rootfs="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
  trap 'rm -rf "$rootfs"' EXIT
  echo "debian-base: debootstrap $SUITE (minbase + python3) from $MIRROR"
  debootstrap --variant=minbase --include=python3,ca-certificates "$SUITE" "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
  # What a slim image leaves out: the apt lists and the downloaded .debs, docs and man pages.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/usr/share/doc/* \
         "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
  printf 'deb %s %s main\ndeb %s %s-updates main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
    "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" "$SUITE" >"$rootfs/etc/apt/sources.list"
  tar --numeric-owner -C "$rootfs" -cf "$TARBALL.tmp" .
  mv -f "$TARBALL.tmp" "$TARBALL"
  rm -rf "$rootfs"
  trap - EXIT
fi

if ! have "$RUNTIME_TAG"; then
  echo "debian-base: importing $TARBALL as $RUNTIME_TAG"
  # buildah has no `import`; a FROM scratch build that ADDs the tarball is the same thing.
  ctx="$(mktemp -d)"
  trap 'rm -rf "$ctx"' EXIT
  ln "$TARBALL" "$ctx/rootfs.tar" 2>/dev/null || cp "$TARBALL" "$ctx/rootfs.tar"
  printf 'FROM scratch\nADD rootfs.tar /\nENV LANG=C.UTF-8\nCMD ["python3"]\n' >"$ctx/Containerfile"
  "${BUILDAH[@]}" bud --quiet --isolation chroot --network host -t "$RUNTIME_TAG" "$ctx" >/dev/null
  rm -rf "$ctx"
  trap - EXIT
fi

if ! have "$BUILD_TAG"; then
  echo "debian-base: building $BUILD_TAG (gcc, libc6-dev, python3-dev, python3-venv)"
  "${BUILDAH[@]}" bud --quiet --isolation chroot --network host -t "$BUILD_TAG" \
    --build-arg BASE="$RUNTIME_TAG" -f "$ROOT/deploy/images/debian-build.Containerfile" "$ROOT/deploy/images" >/dev/null
fi
echo "debian-base: $RUNTIME_TAG and $BUILD_TAG are ready"
