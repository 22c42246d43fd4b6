#!/usr/bin/env bash
# One-command tests on a fresh Debian machine: install what they need (the FUSE
# packages, systemd-analyze for the units, tinyproxy as a forward proxy, the package
# with its test extra), then
# lint, type-check and run every test. Arguments go to pytest (e.g. tests/unit).
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v fusermount3 >/dev/null || ! pkg-config --exists fuse3 2>/dev/null \
        || ! command -v systemd-analyze >/dev/null || ! command -v gcc >/dev/null \
        || ! command -v tinyproxy >/dev/null; then
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        fuse3 libfuse3-dev pkg-config gcc python3-dev systemd tinyproxy >/dev/null
fi
PY=${PYTHON:-python3}
"$PY" -m pip install -q -e '.[test]'

"$PY" -m ruff check modelfs tests bench
"$PY" -m mypy  # modelfs/, as configured in pyproject.toml
"$PY" -m pytest "$@"
