#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels that the lent GPU machine lacks for
# scripts/gpu_check.py and scripts/bench_gpu.py, serving path included (serving.worker imports
# pydantic, boto3 and, through pipelines.identity, insightface at module level). That machine has
# Python 3.12 with torch 2.11 (CUDA), Triton, transformers 5.17, accelerate, numpy, scipy, onnx,
# onnxruntime, opencv-headless, scikit-image, requests and their needs, and no network
# (docs/PERFORMANCE.md, "A session with a GPU"). Versions are the ones this repo's venv runs its
# tests with (PYTHON, default .venv/bin/python). transformers travels at our pin (5.23) and
# replaces the machine's 5.17 there. Tree + wheels must stay under 64 MiB: the script prints both.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PACKAGES=(diffusers transformers torchao boto3 botocore s3transfer jmespath
          pydantic pydantic_core annotated_types typing_inspection pydantic_settings python-dotenv cachetools
          insightface)
[ -x "$PYTHON" ] || make setup
version_of() {  # the venv's version; what only the image installs (torchao) at its requirements-gpu.txt pin
    "$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null \
        || sed -n "s/^$1==//p" requirements-gpu.txt
}
pins=()
for name in "${PACKAGES[@]}"; do
    version=$(version_of "$name")
    [ -n "$version" ] || { echo "no version for $name: not in $PYTHON's venv nor pinned in requirements-gpu.txt" >&2; exit 1; }
    pins+=("$name==$version")
done
rm -rf .whl && mkdir .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
du -sh .whl
echo "tree that travels (tracked + untracked, not ignored) + .whl:"
{ git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1; du -sb .whl; } | awk '{s += $1} END {printf "%.1f MiB\n", s / 2^20}'
