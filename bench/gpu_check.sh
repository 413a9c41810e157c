#!/usr/bin/env bash
# The GPU check of issue 10 (bench/gpu_check.py: what each section does; bench/RESULTS.md).
#
#   bash bench/gpu_check.sh             # on a lent GPU: about 8 minutes, JSON lines in $OUT
#   bash bench/gpu_check.sh --dry-run   # every section on the CPU, tiny (tests run this)
#
# Other options go to gpu_check.py (--only SECTIONS, --budget-s S, --work DIR, --out DIR).
# The GPU machine's Python has torch, numpy, safetensors, psutil, pytest and pytest-timeout but
# not numcodecs nor google-crc32c: carry them as wheels in bench/out/wheels (ignored by git),
# fetched here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d bench/out/wheels numcodecs==0.16.6 google-crc32c==1.9.0
# and name bench/out/wheels in the device tool's carry. They are installed (to /tmp) only when
# the interpreter cannot already import both.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import numcodecs, google_crc32c" 2>/dev/null; then
  for dir in bench/out/wheels .whl; do
    if compgen -G "$dir/*.whl" > /dev/null; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/relex-site "$dir"/*.whl \
        && export PYTHONPATH="/tmp/relex-site${PYTHONPATH:+:$PYTHONPATH}"
      break
    fi
  done
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_check.py "$@"
