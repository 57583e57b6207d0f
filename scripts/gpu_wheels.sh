#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels that the lent GPU machine lacks for
# scripts/bench_gpu.py. That machine has Python 3.12 with a CUDA torch, Triton, numpy, safetensors,
# tokenizers and huggingface-hub, and no network (docs/PERFORMANCE.md, "A session with a GPU").
# Versions are the ones this repo's .venv runs its tests with.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(diffusers transformers torchao boto3 botocore s3transfer jmespath importlib_metadata)
[ -x .venv/bin/python ] || make setup
pins=()
for name in "${PACKAGES[@]}"; do
    pins+=("$name==$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
rm -rf .whl && mkdir .whl
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
du -sh .whl
