#!/usr/bin/env bash
# Carry the shard's GPU wheels to a GPU machine that cannot reach a package index, in parts small enough
# for a transfer limit (the device tool carries at most 64 MiB per call, the working tree included).
#
#   here:    scripts/gpu-wheels.sh download   # wheels pinned by uv.lock into .gpu-wheels/wheels
#            scripts/gpu-wheels.sh split      # .gpu-wheels/parts/NN/, each at most GPU_WHEELS_PART_MIB
#   there:   scripts/gpu-wheels.sh join       # after every parts/NN has arrived: reassemble, check sha256
#            scripts/gpu-wheels.sh install    # pip install --no-deps what the machine lacks into a target dir
#
# For a lent device machine, scripts/gpu-session.sh packs these wheels smaller (xz, 4 transfers) and runs
# the whole session; this script's `download` is its first step.
#
# What is downloaded: the shard's dependencies with its `gpu` extra (cuvs-cu13, libcuvs-cu13, pylibraft-cu13,
# libraft-cu13, rmm-cu13, librmm-cu13, libkvikio-cu13, rapids-logger, nvidia-nvjitlink, grpcio-*, ...) plus
# pytest-asyncio for the gpu tests, at the versions in uv.lock, minus GPU_WHEELS_SKIP: what the device image
# already has (CUDA 13 libraries, CuPy, NumPy) and what no GPU run loads (faiss, psycopg). nvidia-nvjitlink
# is kept: libcuvs/libraft 26.10 need >= 13.3, newer than an image built for CUDA 13.0 has.
# `install` skips a wheel only where the machine has that package at a version at least the wheel's (or the
# lower floor scripts/gpu_session/payload.py names): an older one is shadowed by the target dir.
# See docs/gpu.md for the whole procedure.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${GPU_WHEELS_DIR:-$ROOT/.gpu-wheels}
# 56 MiB leaves room for the ~2 MiB working tree and the generated protos under the 64 MiB per call.
PART_MIB=${GPU_WHEELS_PART_MIB:-56}
PYVER=${GPU_WHEELS_PYTHON:-3.12}   # the device's python3
TARGET=${GPU_WHEELS_TARGET:-/tmp/gpu-site}
SKIP=${GPU_WHEELS_SKIP:-'^(nvidia-(cublas|cuda-[a-z-]+|cufft|cufile|curand|cusolver|cusparse[a-z-]*|nccl[a-z0-9-]*|nvtx|nvshmem[a-z0-9-]*|cudnn[a-z0-9-]*)|cuda-toolkit|cupy-cuda13x|numpy|colorama|tzdata|psycopg[a-z-]*|faiss-cpu)=='}

die() { echo "gpu-wheels: $*" >&2; exit 1; }

requirements() {
    command -v uv >/dev/null || die "uv is needed here (make setup installs it)"
    {
        uv export --frozen --package gmco-shard --extra gpu --no-emit-workspace --no-hashes --no-annotate \
            --no-header --directory "$ROOT"
        uv export --frozen --only-group dev --no-emit-workspace --no-hashes --no-annotate --no-header \
            --directory "$ROOT" | grep -E '^pytest-asyncio=='
    } | sed -e 's/[[:space:]]*;.*//' -e 's/[[:space:]]*$//' | grep -E '^[A-Za-z0-9_.-]+==' \
      | grep -Ev "$SKIP" | sort -u
}

download() {
    mkdir -p "$DIR/wheels"
    requirements > "$DIR/requirements.txt"
    echo "downloading $(wc -l < "$DIR/requirements.txt") wheels for CPython $PYVER x86_64 into $DIR/wheels"
    python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$DIR/wheels" -r "$DIR/requirements.txt"
    du -sh "$DIR/wheels"
}

split_parts() {
    [ -d "$DIR/wheels" ] || die "no $DIR/wheels: run '$0 download' first"
    local limit=$((PART_MIB * 1024 * 1024)) units n=1 used=0 part
    rm -rf "$DIR/parts" "$DIR/pieces"
    mkdir -p "$DIR/parts" "$DIR/pieces"
    (cd "$DIR/wheels" && sha256sum -- *.whl) > "$DIR/pieces/SHA256SUMS"
    # Wheels over the limit become numbered pieces NAME.whl.partNN; small wheels travel whole.
    for whl in "$DIR"/wheels/*.whl; do
        if [ "$(stat -c %s "$whl")" -gt "$limit" ]; then
            split -b "$limit" -d -a 2 "$whl" "$DIR/pieces/$(basename "$whl").part"
        else
            cp "$whl" "$DIR/pieces/"
        fi
    done
    # Fill parts/01, parts/02, ... in order, each at most the limit.
    part=$(printf '%s/parts/%02d' "$DIR" "$n")
    mkdir -p "$part"
    mapfile -t units < <(cd "$DIR/pieces" && ls -1 | sort)
    for unit in "${units[@]}"; do
        local size
        size=$(stat -c %s "$DIR/pieces/$unit")
        if [ $((used + size)) -gt "$limit" ] && [ "$used" -gt 0 ]; then
            n=$((n + 1)); used=0
            part=$(printf '%s/parts/%02d' "$DIR" "$n")
            mkdir -p "$part"
        fi
        mv "$DIR/pieces/$unit" "$part/"
        used=$((used + size))
    done
    rmdir "$DIR/pieces"
    echo "$n parts of at most $PART_MIB MiB; carry each in its own call, in any order:"
    for p in "$DIR"/parts/*/; do
        printf '  %s  %s\n' "$(du -sh "$p" | cut -f1)" "${p#"$ROOT"/}"
    done
}

join_parts() {
    [ -d "$DIR/parts" ] || die "no $DIR/parts here: carry the parts first"
    local sums
    sums=$(ls "$DIR"/parts/*/SHA256SUMS 2>/dev/null | head -1) || true
    [ -n "$sums" ] || die "SHA256SUMS not found: the part holding it has not arrived"
    rm -rf "$DIR/wheels"
    mkdir -p "$DIR/wheels"
    find "$DIR/parts" -name '*.whl' -exec cp {} "$DIR/wheels/" \;
    # Pieces sort by their NN suffix, whichever part directory each one came in.
    for first in $(find "$DIR/parts" -name '*.whl.part00'); do
        local name
        name=$(basename "$first" .part00)
        find "$DIR/parts" -name "$name.part??" -printf '%f\t%p\n' | sort | cut -f2 | xargs cat > "$DIR/wheels/$name"
    done
    (cd "$DIR/wheels" && sha256sum --quiet -c "$sums") || die "a wheel is incomplete: a part is missing or damaged"
    echo "reassembled $(ls "$DIR"/wheels/*.whl | wc -l) wheels in $DIR/wheels (checksums match)"
}

install_wheels() {
    [ -d "$DIR/wheels" ] || die "no $DIR/wheels: run '$0 join' first"
    local todo=()
    # Version-aware: install what the machine lacks or has older than needed (payload.needs_install).
    mapfile -t todo < <(python3 - "$ROOT/scripts/gpu_session" "$DIR"/wheels/*.whl <<'EOF'
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from payload import FLOORS, installed_version, needs_install, wheel_dist
for whl in sys.argv[2:]:
    dist, version = wheel_dist(Path(whl))
    have = installed_version(dist)
    if needs_install(have, version, FLOORS.get(dist)):
        print(whl)
    else:
        print(f"already installed: {dist} {have} (carried {version})", file=sys.stderr)
EOF
)
    if [ "${#todo[@]}" -gt 0 ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TARGET" \
            "${todo[@]}"
    fi
    echo "installed ${#todo[@]} wheels into $TARGET; now:"
    echo "  export PYTHONPATH=$TARGET:$(cd "$ROOT" && printf '%s:' "$PWD"/libs/*/src "$PWD"/services/shard/src)"
}

case "${1:-}" in
    download) download ;;
    split) split_parts ;;
    join) join_parts ;;
    install) install_wheels ;;
    *) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
