#!/usr/bin/env bash
# kvpack in the browser. Builds the wasm package (web/pkg) and then:
#   scripts/web.sh            serve the page on http://127.0.0.1:8080/ (PORT=N to change)
#   scripts/web.sh build      only build web/pkg
#   scripts/web.sh test       run the browser test: headless Chromium's WebGPU generates greedy
#                             tokens with f32 and turbo4 caches and must equal the native engine's
# Installs what it needs: the wasm32 target, wasm-bindgen-cli at Cargo.lock's version, and for
# `test` Debian's chromium and npm's playwright-core (in web/node_modules).
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-serve}"
export KVPACK_TARGET_DIR="${CARGO_TARGET_DIR:-target}"

rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
want=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
have=$(wasm-bindgen --version 2>/dev/null | awk '{ print $2 }' || true)
if [ "$have" != "$want" ]; then
  echo "== installing wasm-bindgen-cli $want (once, a few minutes)"
  cargo install wasm-bindgen-cli --version "$want"
fi
scripts/fetch-model.sh

echo "== building the wasm package"
cargo build -p kvpack-web --target wasm32-unknown-unknown --release
wasm-bindgen --target web --no-typescript --out-dir web/pkg \
  "$KVPACK_TARGET_DIR/wasm32-unknown-unknown/release/kvpack_web.wasm"
echo "web/pkg: $(du -h web/pkg/kvpack_web_bg.wasm | cut -f1) of wasm"

case "$mode" in
  build) ;;
  serve) exec node web/serve.mjs --port "${PORT:-8080}" ;;
  test)
    SUDO=""
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
    if [ ! -x /usr/bin/chromium ]; then
      echo "== installing chromium"
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
    fi
    (cd web && npm ci --silent --no-audit --no-fund)
    echo "== native reference tokens (Vulkan)"
    cargo build --bin kvpack
    node web/tests/browser.mjs
    ;;
  *) echo "usage: scripts/web.sh [serve|build|test]" >&2; exit 2 ;;
esac
