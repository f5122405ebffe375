#!/usr/bin/env bash
# Generate the Python gRPC stubs (+ .pyi) for every protos/**/*.proto into the shared gmco-protos package
# (libs/protos/src/gmco/...). The one place the protoc command lives: `make protos` and both image builds
# (deploy/images/*.Dockerfile) run it.
#
#   PYTHON="uv run --frozen python" scripts/gen-protos.sh   # make protos: the workspace's grpcio-tools
#   scripts/gen-protos.sh                                   # the images: uv runs the grpcio-tools version
#                                                           # pinned in uv.lock in a throwaway environment
#
# Run from anywhere; paths are relative to the repository root.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/libs/protos/src"
cd "$ROOT"

if [ -z "${PYTHON:-}" ]; then
  # The version uv.lock pins, so the stubs match the protobuf runtime the services are locked to.
  version="$(python3 - <<'PY'
import tomllib
lock = tomllib.load(open("uv.lock", "rb"))
print(next(p["version"] for p in lock["package"] if p["name"] == "grpcio-tools"))
PY
)"
  PYTHON="${UV:-uv} run --no-project --with grpcio-tools==$version python"
fi

rm -rf "$OUT/gmco"
mkdir -p "$OUT"
mapfile -t protos < <(find protos -name '*.proto' | sort)
# shellcheck disable=SC2086  # PYTHON is a command line
$PYTHON -m grpc_tools.protoc -Iprotos --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" "${protos[@]}"
find "$OUT/gmco" -type d -exec touch {}/__init__.py \;
echo "gen-protos: ${#protos[@]} protos -> ${OUT#"$ROOT"/}/gmco"
