#!/usr/bin/env bash
# Installs the system packages the tests and the local stack need:
#   redis-server and PostgreSQL 15   the integration tests and the local stack's real backends
#   curl                             downloads in the benches
#   openssl                          throw-away certificates for the mTLS tests (gmco_testing.tls)
#   debootstrap, buildah, podman     images built and run without a Docker daemon (make images, tests/images)
#   runc                             the OCI runtime podman is told to use here (crun's defaults are refused)
#   prometheus                       promtool, which checks and unit-tests deploy/prometheus (tests/deploy)
# Idempotent; does nothing when they are present. Needs root (CI runs as root) or sudo.
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
[ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql-15)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v buildah >/dev/null 2>&1 || need+=(buildah)
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v runc >/dev/null 2>&1 || need+=(runc)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "setup-system: installing ${need[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "setup-system: need root to apt-get install ${need[*]}" >&2; exit 1; }
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
# Do not start the packaged services (redis, postgresql, prometheus): the tests and the local stack start
# their own on free ports.
printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
$SUDO chmod +x /usr/sbin/policy-rc.d
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
$SUDO rm -f /usr/sbin/policy-rc.d
