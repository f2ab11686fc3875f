#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` from the llama.cpp source that the pinned llama-cpp-python sdist vendors, so the
# serving peer of `celeris bench serve` runs the same llama.cpp as the `celeris bench engine` peer. Called by
# `make peers`; skips when the binary for that version is already installed.
#
#   scripts/build_llama_server.sh [VENV]      # VENV defaults to .venv; the binary lands in VENV/bin/llama-server
#
# CPU only, compiled for this CPU (GGML_NATIVE), statically linked (one file to install), no HTTPS or downloads:
# the web UI's prebuilt assets come from the network, and the bench only uses the HTTP API.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$(cd "${1:-$ROOT/.venv}" && pwd)"
PYTHON="$VENV/bin/python"
JOBS="${JOBS:-2}"

# The pin lives in one place: pyproject.toml's `peers` extra.
VERSION="$(grep -o 'llama-cpp-python==[0-9][0-9.]*' "$ROOT/pyproject.toml" | head -1 | cut -d= -f3)"
[ -n "$VERSION" ] || { echo "build_llama_server: no llama-cpp-python==X pin in pyproject.toml" >&2; exit 2; }

WORK="$VENV/peers/llama-cpp-python-$VERSION"
BINARY="$VENV/bin/llama-server"
STAMP="$VENV/peers/llama-server.stamp"

if [ -x "$BINARY" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "llama-cpp-python==$VERSION" ]; then
    echo "llama-server already built from llama-cpp-python==$VERSION: $BINARY"
    exit 0
fi

mkdir -p "$WORK"
SDIST="$WORK/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK"
fi
SRC="$WORK/llama_cpp_python-$VERSION"
[ -d "$SRC/vendor/llama.cpp" ] || tar -xzf "$SDIST" -C "$WORK"
LLAMA="$SRC/vendor/llama.cpp"

# The sdist carries the submodule's git metadata, so llama.cpp's build-info (and `llama-server --version`) names
# the vendored commit.
cmake -S "$LLAMA" -B "$WORK/build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_UI=OFF
cmake --build "$WORK/build" --target llama-server -j "$JOBS"

install -m 755 "$WORK/build/bin/llama-server" "$BINARY"
echo "llama-cpp-python==$VERSION" > "$STAMP"
"$BINARY" --version 2>&1 | grep -i version || true
echo "llama-server built from llama-cpp-python==$VERSION: $BINARY"
