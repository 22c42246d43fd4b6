#!/usr/bin/env bash
# One-command demo, offline: install, start the bundled Hub origin on a generated
# repo, mount it, list it, read and checksum the weights through the mount, unmount.
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
.venv/bin/python -m pip install -q -e .
PATH="$PWD/.venv/bin:$PATH"

WORK=$(mktemp -d /tmp/modelfs-demo.XXXXXX)
MNT="$WORK/models"; mkdir -p "$MNT"
ORIGIN_PID=""
cleanup() {
    if grep -qs " $MNT " /proc/mounts; then fusermount3 -u "$MNT" || true; fi
    if [ -n "$ORIGIN_PID" ]; then kill "$ORIGIN_PID" 2>/dev/null || true; wait "$ORIGIN_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "== starting the bundled Hub origin on 127.0.0.1 with a generated 64 MiB model"
python -m modelfs.testing.origin --root "$WORK/origin" --demo --port 0 > "$WORK/origin.out" 2>&1 &
ORIGIN_PID=$!
for _ in $(seq 100); do grep -q '^origin ' "$WORK/origin.out" && break; sleep 0.1; done
URL=$(awk '/^origin /{print $2; exit}' "$WORK/origin.out")
echo "   $URL"

echo "== modelfs mount $MNT --endpoint $URL --repo demo/tiny-model"
modelfs mount "$MNT" --endpoint "$URL" --repo demo/tiny-model --cache-dir "$WORK/cache"

echo "== ls -lR $MNT   (sizes are known before any byte is fetched)"
ls -lR "$MNT"

echo "== first 8 bytes of the safetensors header, read through the mount"
python -c "import struct,sys; print('header length:', struct.unpack('<Q', open(sys.argv[1],'rb').read(8))[0])" \
    "$MNT/demo/tiny-model/model.safetensors"

echo "== sha256 through the mount vs at the origin"
A=$(sha256sum "$MNT/demo/tiny-model/model.safetensors" | cut -d' ' -f1)
B=$(sha256sum "$WORK/origin/demo/tiny-model/main/model.safetensors" | cut -d' ' -f1)
echo "   mount:  $A"; echo "   origin: $B"
[ "$A" = "$B" ] || { echo "MISMATCH"; exit 1; }

echo "== modelfs umount $MNT"
modelfs umount "$MNT"
echo "demo OK"
