#!/usr/bin/env bash
# One prepared call on a lent GPU machine (torch with CUDA and triton already
# installed, no internet): the Triton backend's tests on the device, then the
# GPU benchmark. Everything it prints lands in $OUT (default ./device-out).
#
#   bash benchmarks/device_run.sh   # bounded by its timeouts: about 10 minutes, one device call
#   TESTS_S=120 ATTN_S=150 LINEAR_S=90 bash benchmarks/device_run.sh   # shorter
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}
mkdir -p "$OUT"
TESTS_S=${TESTS_S:-150}
ATTN_S=${ATTN_S:-200}      # the attention benchmark's budget (rows past it are skipped)
LINEAR_S=${LINEAR_S:-120}  # the linear family's

python -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
    | tee "$OUT/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/device.txt"

# the Triton backend against the dense interpreter, on the device (no interpreter)
timeout "$TESTS_S" python -m pytest -q -x -p no:cacheprovider \
    tests/test_triton_flash.py tests/test_triton_decode.py tests/test_triton_recurrent.py \
    $(ls tests/test_triton_chunked.py tests/test_triton_per_channel.py 2>/dev/null) \
    2>&1 | tail -30 | tee "$OUT/tests.txt"

# the benchmark (its budgets and watchdogs keep each part within its share)
timeout $((ATTN_S + LINEAR_S + 120)) python benchmarks/gpu.py --backend triton \
    --budget "$ATTN_S" --linear-budget "$LINEAR_S" --out "$OUT/triton_bench.md" 2>&1 | tail -150
