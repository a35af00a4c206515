#!/usr/bin/env bash
# One GPU session: install the torchao wheel carried in .whl (if any), run the CUDA tests,
# then the requested benchmarks; logs and JSON go to $OUT (and benchmarks/results/).
# Usage: bash benchmarks/gpu_run.sh tests|ops|decode [extra args for the benchmark]
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} LOWBIT_RESULTS_DIR=$OUT
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
what=$1; shift
case "$what" in
  tests) python3 -m pytest -m cuda -q -p no:cacheprovider tests 2>&1 | tee "$OUT/cuda_tests.log" ;;
  ops) python3 benchmarks/bench_ops.py "$@" 2>&1 | tee "$OUT/ops.log" ;;
  decode) python3 benchmarks/bench_decode.py "$@" 2>&1 | tee "$OUT/decode.log" ;;
esac
