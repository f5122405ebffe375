#!/bin/sh
# What an image's build stage needs beyond its base, installed with apt only where it is missing:
#   always   python3 -m venv (uv is installed from PyPI into a venv)
#   cc       a C compiler and the Python headers (gmco-kernels, the shard's C extension)
# The local Debian build base (scripts/debian-base.sh) has all of it, so nothing is installed there;
# python:3.11-slim-bookworm (the Dockerfiles' default) gets gcc and libc6-dev.
set -eu
need=""
python3 -c 'import ensurepip' 2>/dev/null || need="$need python3-venv"
if [ "${1:-}" = cc ]; then
  command -v gcc >/dev/null 2>&1 || need="$need gcc libc6-dev"
  python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || need="$need python3-dev"
fi
if [ -n "$need" ]; then
  echo "build-deps.sh: apt-get install$need"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
  rm -rf /var/lib/apt/lists/*
fi
