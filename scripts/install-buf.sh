#!/usr/bin/env bash
# Install the buf CLI into .tools/bin/buf (idempotent). `buf curl` is the gRPC command-line client the
# documentation's examples run through (tests/docs): it reads the services' schemas by server reflection.
#
# The binary comes from the npm package @bufbuild/buf-linux-x64 (what `npm install @bufbuild/buf` picks for
# this platform), fetched with `npm pack` through the ordinary npm client; no other download.
set -euo pipefail

BUF_VERSION="${GMCO_BUF_VERSION:-1.47.2}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
BUF="$TOOLS/bin/buf"

if [[ -x "$BUF" ]] && [[ "$("$BUF" --version 2>/dev/null)" == "$BUF_VERSION" ]]; then
  echo "buf ${BUF_VERSION} already installed at ${BUF#"$ROOT"/}"
  exit 0
fi
case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) PKG="@bufbuild/buf-linux-x64" ;;
  Linux-aarch64) PKG="@bufbuild/buf-linux-aarch64" ;;
  Darwin-arm64) PKG="@bufbuild/buf-darwin-arm64" ;;
  Darwin-x86_64) PKG="@bufbuild/buf-darwin-x64" ;;
  *) echo "install-buf.sh: no @bufbuild/buf package for $(uname -s)-$(uname -m); put buf at ${BUF}" >&2; exit 1 ;;
esac
command -v npm >/dev/null || { echo "install-buf.sh: npm is needed (apt-get install npm)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "fetching ${PKG}@${BUF_VERSION} with npm pack"
(cd "$work" && npm pack --silent "${PKG}@${BUF_VERSION}" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work" package/bin/buf
mkdir -p "$TOOLS/bin"
install -m 0755 "$work/package/bin/buf" "$BUF"
echo "installed buf $("$BUF" --version) at ${BUF#"$ROOT"/}"
