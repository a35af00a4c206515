#!/usr/bin/env bash
# One GPU session: install the torchao wheel carried in .whl (if any), run the CUDA tests,
# then the requested benchmarks; logs and JSON go to $OUT (and benchmarks/results/).
# Usage: bash benchmarks/gpu_run.sh tests|kernels|ops|decode|sparse|... [extra benchmark args]
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
  # The kernel tests without the marker filter: the tiny-shape ones then run compiled too.
  kernels) python3 -m pytest -q -p no:cacheprovider tests/kernels tests/sparsity 2>&1 \
        | tee "$OUT/kernel_tests.log" ;;
  ops) python3 benchmarks/bench_ops.py "$@" 2>&1 | tee "$OUT/ops.log" ;;
  decode) python3 benchmarks/bench_decode.py "$@" 2>&1 | tee "$OUT/decode.log" ;;
  sweep) python3 benchmarks/sweep_gemm_tiles.py "$@" 2>&1 | tee "$OUT/sweep.log" ;;
  mx) python3 -m pytest -q -p no:cacheprovider tests/kernels/test_mx_triton.py 2>&1 \
        | tee "$OUT/mx_tests.log"
      python3 benchmarks/bench_mx.py "$@" 2>&1 | tee "$OUT/mx.log" ;;
  sparse) { python3 -m pytest -m cuda -q -p no:cacheprovider tests/sparsity; \
             python3 benchmarks/bench_sparse.py "$@"; } 2>&1 | tee "$OUT/sparse.log" ;;
  fp8train) { python3 -m pytest -m cuda -q -p no:cacheprovider tests/training/test_float8_cuda.py; \
               python3 benchmarks/bench_fp8_training.py "$@"; } 2>&1 | tee "$OUT/fp8_training.log" ;;
  fp8conv) python3 benchmarks/train_fp8_convergence.py train "$@" 2>&1 \
        | tee "$OUT/fp8_convergence.log" ;;
  fsdp) python3 -m torch.distributed.run --standalone --nproc_per_node=${NGPU:-2} \
        benchmarks/bench_fsdp_fp8.py "$@" 2>&1 | tee "$OUT/fsdp.log" ;;
  optim) python3 benchmarks/bench_optim.py "$@" 2>&1 | tee "$OUT/optim.log" ;;
  optimtests) python3 -m pytest -m cuda -q -p no:cacheprovider tests/optim 2>&1 \
        | tee "$OUT/optim_tests.log" ;;
  # The parsed Wikipedia cache travels in the tree: copy ~/.cache/lowbit/corpora/wiki-v1.json
  # to benchmarks/data/lowbit-cache/corpora/ first (no gensim on the GPU machine).
  optimconv) LOWBIT_CACHE=${LOWBIT_CACHE:-$PWD/benchmarks/data/lowbit-cache} \
      python3 benchmarks/converge_optim.py --device cuda --preset small --ffn 3072 --steps 1000 \
        --batch 16 --seq 512 --lr 6e-4 "$@" 2>&1 | tee "$OUT/converge_optim.log" ;;
esac
