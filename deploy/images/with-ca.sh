#!/bin/sh
# Runs one build-stage command (the downloads from PyPI: pip, uv). Where the build was handed an extra CA
# bundle as the secret "ca-certificates" (behind a TLS-intercepting proxy:
#   --secret id=ca-certificates,src=/etc/ssl/certs/ca-certificates.crt
# scripts/build-images.sh passes the host's SSL_CERT_FILE), pip and uv trust it. The secret is mounted
# for that RUN only: nothing of it stays in a layer.
set -eu
ca=/run/secrets/ca-certificates
if [ -s "$ca" ]; then
  export SSL_CERT_FILE="$ca" PIP_CERT="$ca"
fi
exec "$@"
