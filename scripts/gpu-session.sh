#!/usr/bin/env bash
# One GPU session for the shard, prepared and rehearsed here so that device minutes go to measuring.
#
#   here:   scripts/gpu-wheels.sh download     # the wheels uv.lock pins (+ nvidia-nvjitlink 13.5: see docs/gpu.md)
#           scripts/gpu-session.sh pack        # -> .gpu-wheels/session/NN (at most 4 parts) + kernels/
#           scripts/gpu-session.sh plan        # the device tool calls to make, in order, with their carry lists
#           scripts/gpu-session.sh rehearse    # the whole session here, on CPU stand-ins (proves plumbing only)
#   there:  scripts/gpu-session.sh receive     # each call but the last: which parts have arrived (seconds)
#           scripts/gpu-session.sh device      # the last call: install, import check, API probe, gpu tests,
#                                              # benchmark; at most 8 files under $OUT
#
# The device tool carries ignored paths (`carry`), 64 MiB a call with the working tree, and gives an idle
# machine back 30 s after a call: make the calls back to back. Parts already there stay between calls.
# Nothing here estimates a GPU figure; a rehearsal only shows that every step runs and writes its file.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SESSION=${GPU_SESSION_DIR:-$ROOT/.gpu-wheels/session}
WHEELS=${GPU_WHEELS_DIR:-$ROOT/.gpu-wheels}
PY=${GPU_SESSION_PYTHON:-python3}
TARGET=${GPU_SESSION_TARGET:-/tmp/gpu-site}
STAGE=${GPU_SESSION_STAGE:-/tmp/gpu-stage}
PART_MIB=${GPU_SESSION_PART_MIB:-56}  # + the ~3 MiB working tree, under the 64 MiB a call
MAX_PARTS=${GPU_SESSION_MAX_PARTS:-4}
# Not carried: faiss (no GPU test or the bench uses the CPU indexes), psycopg (the shard no longer imports it).
SKIP=${GPU_SESSION_SKIP:-'^(faiss_cpu|psycopg)'}
BUDGET=${GPU_SESSION_SECONDS:-560}     # the device command's own limit; the tool's is 600 s
PROBE_SECONDS=${GPU_SESSION_PROBE_SECONDS:-200}
TEST_SECONDS=${GPU_SESSION_TEST_SECONDS:-150}
BENCH_ARGS=${GPU_SESSION_BENCH_ARGS:-}
GPU_TESTS=(services/shard/tests/test_shard_gpu.py services/shard/tests/test_shard_cupy.py)
KERNELS_SRC=libs/kernels/src/gmco_kernels

die() { echo "gpu-session: $*" >&2; exit 1; }

# -- here ---------------------------------------------------------------------------------------------
build_kernels() {
    # gmco_kernels is a C extension built for this python; the device's python3 is another version. Its
    # only Python API use is module creation, so a limited-API (abi3) build loads on any CPython >= 3.11.
    local out=$1 include
    include=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    mkdir -p "$out"
    cc -O3 -std=c11 -shared -fPIC -fno-strict-aliasing -DPy_LIMITED_API=0x030B0000 -I"$include" \
        "$KERNELS_SRC/kernels.c" -o "$out/_kernels.abi3.so" -lm
}

pack() {
    local wheels=()
    mapfile -t wheels < <(ls "$WHEELS"/wheels/*.whl "$WHEELS"/extra/*.whl 2>/dev/null | while read -r w; do
        basename "$w" | grep -Eq "$SKIP" || echo "$w"; done)
    [ "${#wheels[@]}" -gt 0 ] || die "no wheels in $WHEELS/wheels: run scripts/gpu-wheels.sh download, then fetch \
nvidia-nvjitlink>=13.3 into $WHEELS/extra (docs/gpu.md)"
    ls "$WHEELS"/extra/nvidia_nvjitlink-* >/dev/null 2>&1 || echo "gpu-session: warning: no nvidia-nvjitlink \
wheel in $WHEELS/extra; libcuvs 26.10 will not load on an image with nvJitLink < 13.3" >&2
    [ -f libs/protos/src/gmco/shard/v1/shard_service_pb2.py ] || die "no generated protos: run make protos"
    $PY scripts/gpu_session/payload.py pack --out "$SESSION" --part-mib "$PART_MIB" --max-parts "$MAX_PARTS" \
        ${GPU_SESSION_PRUNE_SM:+--prune-sm "$GPU_SESSION_PRUNE_SM"} ${GPU_SESSION_FAST:+--fast} "${wheels[@]}"
    build_kernels "$SESSION/kernels"
    plan
}

tree_mib() {  # what travels with every call: tracked and untracked-not-ignored files
    { git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null || true; } \
        | tail -1 | cut -f1
}

plan() {
    [ -d "$SESSION" ] || die "no $SESSION: run '$0 pack' first"
    local parts=() tree last i carry size rel=${SESSION#"$ROOT"/}
    mapfile -t parts < <(cd "$SESSION" && ls -d [0-9][0-9] | sort)
    tree=$(tree_mib)
    last=${parts[-1]}
    echo "working tree: $((tree / 1048576)) MiB a call; ${#parts[@]} parts; make these calls back to back:"
    i=1
    for part in "${parts[@]}"; do
        carry="\"$rel/$part\""
        size=$(du -sb "$SESSION/$part" | cut -f1)
        if [ "$part" = "$last" ]; then
            carry="$carry, \"$rel/kernels\", \"libs/protos/src/gmco\""
            size=$((size + $(du -sb "$SESSION/kernels" libs/protos/src/gmco | awk '{s+=$1} END {print s}')))
            echo "  $i. run(command=\"bash scripts/gpu-session.sh device\", carry=[$carry], timeout_s=600)"
        else
            echo "  $i. run(command=\"bash scripts/gpu-session.sh receive\", carry=[$carry], timeout_s=120)"
        fi
        echo "     $(( (size + tree) / 1048576 )) MiB with the tree (limit 64)"
        [ $((size + tree)) -le $((64 * 1048576)) ] || echo "     TOO LARGE: pack with a smaller GPU_SESSION_PART_MIB"
        i=$((i + 1))
    done
    echo "then: copy files_at/bench_gpu.json to bench/results/, and read session.log, probe.json, pytest.log"
}

# -- there --------------------------------------------------------------------------------------------
facts() {
    nvidia-smi -L 2>&1 || true
    $PY -V
    $PY - <<'EOF' 2>&1 || true
import importlib.metadata as m
for d in ("numpy", "cupy-cuda13x", "nvidia-nvjitlink", "nvidia-nvjitlink-cu13", "cuda-bindings", "cuda-pathfinder",
          "cuda-toolkit", "grpcio", "protobuf", "pytest", "prometheus-client", "nvidia-ml-py", "torch"):
    try:
        print(f"  {d}=={m.version(d)}")
    except m.PackageNotFoundError:
        print(f"  {d}: absent")
EOF
}

receive() {
    $PY scripts/gpu_session/payload.py check --session "$SESSION"
    facts
}

setup_env() {
    local site dirs=() d
    site=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    export PYTHONPATH="$TARGET:$(printf '%s:' "$ROOT"/libs/*/src)$ROOT/services/shard/src${GPU_SESSION_EXTRA_PYTHONPATH:+:$GPU_SESSION_EXTRA_PYTHONPATH}"
    # libcuvs's RPATH ($ORIGIN/../../nvidia/cu13/lib) points into the target, which holds only what was
    # carried: the carried nvJitLink first, then the image's own CUDA and NCCL libraries.
    for d in "$TARGET/nvidia/cu13/lib" "$site/nvidia/cu13/lib" "$site/nvidia/nccl/lib" "$TARGET/nvidia/nccl/lib"; do
        [ -d "$d" ] && dirs+=("$d")
    done
    if [ "${#dirs[@]}" -gt 0 ]; then
        export LD_LIBRARY_PATH="$(IFS=:; echo "${dirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    # Load the carried nvJitLink before anything (CuPy, the image's CUDA libraries) maps an older one.
    if [ -f "$TARGET/nvidia/cu13/lib/libnvJitLink.so.13" ]; then
        export LD_PRELOAD="$TARGET/nvidia/cu13/lib/libnvJitLink.so.13${LD_PRELOAD:+:$LD_PRELOAD}"
    fi
    if ! $PY -c 'import gmco_kernels' 2>/dev/null; then
        if [ -f "$SESSION/kernels/_kernels.abi3.so" ]; then
            cp "$SESSION/kernels/_kernels.abi3.so" "$KERNELS_SRC/"
        else
            build_kernels "$KERNELS_SRC" || true
        fi
    fi
    $PY -c 'import gmco_kernels; print("gmco_kernels", gmco_kernels.SIMD)' || echo "gmco_kernels does not load"
    export PYTHONUNBUFFERED=1
    echo "PYTHONPATH=$PYTHONPATH"
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    echo "LD_PRELOAD=${LD_PRELOAD:-}"
}

step() {  # step NAME SECONDS COMMAND...: run with a limit, log its time and status, never stop the session
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
    set +e
    timeout -k 10 "$limit" "$@"
    rc=$?
    set -e
    echo "== $name: rc=$rc in $(( $(date +%s) - start ))s"
    return 0
}

device() {
    local began left
    began=$(date +%s)
    echo "gpu-session device: $(date -u) in $ROOT"
    facts
    # The image's own versions decide what is installed (a rehearsal's "image" is GPU_SESSION_EXTRA_PYTHONPATH).
    PYTHONPATH=${GPU_SESSION_EXTRA_PYTHONPATH:-} step install 120 $PY scripts/gpu_session/payload.py install --session "$SESSION" --target "$TARGET" \
        --stage "$STAGE" --report "$OUT/install.json"
    setup_env
    step probe "$PROBE_SECONDS" $PY scripts/gpu_session/probe.py all --out "$OUT/probe.json" --timeout 60 \
        --jobs "${GPU_SESSION_PROBE_JOBS:-1}"
    step gpu-tests "$TEST_SECONDS" bash -c "$PY -m pytest -m gpu -p no:cacheprovider -q -rfE \
        --junitxml='$OUT/pytest.xml' ${GPU_TESTS[*]} > '$OUT/pytest.log' 2>&1; rc=\$?; tail -25 '$OUT/pytest.log'; exit \$rc"
    left=$(( BUDGET - ($(date +%s) - began) - 5 ))
    if [ "$left" -gt 30 ]; then
        # shellcheck disable=SC2086 # BENCH_ARGS is a word list
        step bench "$left" bash -c "$PY bench/bench_gpu.py --out '$OUT/bench_gpu.json' $BENCH_ARGS > '$OUT/bench.log' 2>&1; \
rc=\$?; tail -30 '$OUT/bench.log'; exit \$rc"
    else
        echo "== bench: skipped, ${left}s left"
    fi
    echo "gpu-session device: done in $(( $(date +%s) - began ))s; files under \$OUT:"
    ls -la "$OUT"
}

# -- rehearsal ----------------------------------------------------------------------------------------
rehearse() {
    local tmp standins py
    tmp=${GPU_SESSION_REHEARSAL_DIR:-$(mktemp -d)}
    standins=$ROOT/scripts/gpu-standins
    py=${GPU_SESSION_PYTHON:-$ROOT/.venv/bin/python}
    [ -x "$py" ] || py=python3
    echo "rehearsal in $tmp (CPU stand-ins: no figure here is a GPU figure)"
    "$py" scripts/gpu_session/rehearse.py prepare --dir "$tmp"
    GPU_SESSION_PYTHON=$py GPU_WHEELS_DIR=$tmp/wheels GPU_SESSION_DIR=$tmp/session GPU_SESSION_PART_MIB=0.0025 \
        GPU_SESSION_FAST=1 GPU_SESSION_SKIP='^$' "$0" pack
    # The transfers: one part a call into the "device" copy, `receive` after each.
    mkdir -p "$tmp/device-session"
    for part in "$tmp"/session/[0-9][0-9]; do
        cp -r "$part" "$tmp/device-session/"
        GPU_SESSION_PYTHON=$py GPU_SESSION_DIR=$tmp/device-session "$0" receive > "$tmp/receive.log" 2>&1
        head -1 "$tmp/receive.log"
    done
    cp -r "$tmp/session/kernels" "$tmp/device-session/"
    OUT=$tmp/out PATH="$standins/bin:$PATH" GMCO_PROBE_SCALE=0.02 GPU_SESSION_PROBE_JOBS=3 GMCO_STANDIN_ALLOC_LIMIT=$((256 << 20)) \
        GPU_SESSION_PYTHON=$py GPU_SESSION_DIR=$tmp/device-session \
        GPU_SESSION_TARGET=$tmp/site GPU_SESSION_STAGE=$tmp/stage \
        GPU_SESSION_EXTRA_PYTHONPATH="$tmp/image:$tmp/blocker" GPU_SESSION_SECONDS=${GPU_SESSION_SECONDS:-300} \
        GPU_SESSION_BENCH_ARGS="--items 6000 --dim 64 --queries 200 --itopk 32 64 --batches 1 100 --seconds 0.05 \
--ceiling-n 128 --copy-mib 4 --grpc-items 2000 --grpc-calls 64" "$0" device
    "$py" scripts/gpu_session/rehearse.py verify --dir "$tmp"
}

case "${1:-}" in
    pack) pack ;;
    plan) plan ;;
    receive) receive ;;
    device)
        : "${OUT:?OUT is not set: run this through the device tool, or set OUT to a folder}"
        mkdir -p "$OUT"
        device 2>&1 | tee "$OUT/session.log" ;;
    rehearse) rehearse ;;
    *) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
