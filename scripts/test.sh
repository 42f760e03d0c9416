#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what it needs, then checks formatting, lints,
# cross-target builds and runs every test. GPU tests run for real on lavapipe (Vulkan) and
# llvmpipe (OpenGL); a missing adapter fails them. Last, the browser test: the page in headless
# Chromium (WebGPU) must generate the native engine's tokens (scripts/web.sh test). Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
need_apt=()
# Vulkan through lavapipe when no Vulkan driver is installed.
if ! compgen -G "/usr/share/vulkan/icd.d/*.json" >/dev/null && ! compgen -G "/etc/vulkan/icd.d/*.json" >/dev/null; then
  need_apt+=(mesa-vulkan-drivers libvulkan1)
fi
# OpenGL through llvmpipe (EGL, surfaceless).
if ! ldconfig -p | grep -q libEGL_mesa; then need_apt+=(libegl-mesa0 libegl1 libgl1-mesa-dri); fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Cross targets: the engine must build for the browser, Apple, Windows and Android.
TARGETS=(wasm32-unknown-unknown aarch64-apple-darwin x86_64-pc-windows-msvc aarch64-linux-android)
installed=$(rustup target list --installed)
for t in "${TARGETS[@]}"; do
  grep -qx "$t" <<<"$installed" || rustup target add "$t"
done

# The default model, for the tests that read the real GGUF (tokenizer vectors).
echo "== fetching the default model (once)"
scripts/fetch-model.sh

export KVPACK_TEST_BACKENDS="${KVPACK_TEST_BACKENDS:-vulkan,gl}"
# Mesa's EGL warns about a missing runtime dir on headless machines; give it one.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
cargo clippy -p kvpack-web --target wasm32-unknown-unknown -- -D warnings
for t in "${TARGETS[@]}"; do
  echo "== cargo check --target $t"
  cargo check --lib --no-default-features --target "$t"
done
echo "== cargo test (GPU backends: $KVPACK_TEST_BACKENDS)"
cargo test --all-targets
cargo test --doc
echo "== browser test (headless Chromium, WebGPU)"
scripts/web.sh test
