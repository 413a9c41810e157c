#!/usr/bin/env bash
# The GPU check of issue 3, for a lent H100/H200 (see bench/RESULTS.md). Under 5 minutes.
# The machine's image has torch, safetensors, numpy, tqdm and psutil but not zarr or
# numcodecs: carry them as wheels in .whl/ (README of the device tool), e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl zarr==3.1.6 numcodecs==0.16.6 donfig \
#     google-crc32c typing_extensions packaging
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 bench/gpu_check.py "$@" | tee "${OUT:-/tmp}/gpu_check.json"
