#!/usr/bin/env bash
# The benchmark suite on one GPU, in one short prepared run (at most 8.5 minutes: 150 + 120 + 240 s).
#
#   OUT=/some/folder DATA_DIR=path/holding/MNIST/raw bash benchmarks/gpu.sh
#
# Run from the repository root (the script sets PYTHONPATH=. itself). The GPU machine has jax
# (CUDA), torch, flax, optax, chex and torchvision but no MNIST and no internet: copy MNIST into
# a git-ignored folder inside the repository and pass it as DATA_DIR (default: ./data).
# lightning may be missing there; that variant is then recorded as skipped.
#
# TTA_LIMIT and THROUGHPUT_LIMIT (seconds) override the phase limits below.
# Phases, each with its own time limit so that one slow phase cannot eat the others; every
# phase writes results.json/results.md/plots into its own folder under $OUT as it goes:
#   1. cnn_tta_cold: CNN to 99% test accuracy over seeds 0-9 (SEEDS), mean ± std, fresh JAX
#      persistent compilation cache (the first seed compiles cold; later seeds reuse the
#      process's compilations, and each run's compile estimate says so).
#   2. cnn_tta_warm: the same again in a new process, compilations read from that cache.
#   3. throughput:   mlp/cnn/lstm x batch 64/256/1024, all variants, interleaved.
# TINY=1 runs every phase on the tiny settings (a CPU syntax/smoke check of this script).
set -uo pipefail

OUT=${OUT:?set OUT to the folder that receives the results}
DATA_DIR=${DATA_DIR:-data}
TINY=${TINY:-0}
SEEDS=${SEEDS:-0,1,2,3,4,5,6,7,8,9}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxlight-bench-jax-cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
# JAX would otherwise take 75% of the GPU's memory up front, leaving torch the rest and making
# its peak-memory figure meaningless.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p "$OUT"
rm -rf "$JAX_COMPILATION_CACHE_DIR"

{ nvidia-smi || true; python -c "import jax; print(jax.devices())"; } > "$OUT/device.txt" 2>&1

if [ "$TINY" = 1 ]; then
    MODE=(--tiny); TTA="mlp:0.5:1:jax_fused+torch_memory"; LIMIT=300; SEEDS=0,1
    THROUGHPUT=(--tiny)
else
    MODE=(--tta-only)
    TTA="cnn:0.99:6:jax_fused+torch_memory"; LIMIT=${TTA_LIMIT:-135}
    THROUGHPUT=(--variants jax_fused,jax_step,jax_trainer,torch_memory,torch_compile,lightning --repeats 3
                --window-samples 12800)
fi

status=0
for phase in cnn_tta_cold cnn_tta_warm; do
    # --allow-busy: a lease is short; a busy host is recorded and marked in the tables instead.
    timeout "$LIMIT" python -m benchmarks.run "${MODE[@]}" --allow-busy --data-dir "$DATA_DIR" --out "$OUT/$phase" \
        --tta "$TTA" --seeds "$SEEDS" --tta-batch-size 128 --tta-evals-per-epoch 4 > "$OUT/$phase.log" 2>&1 || status=$?
    tail -n 25 "$OUT/$phase.log"
done
timeout "$([ "$TINY" = 1 ] && echo 300 || echo "${THROUGHPUT_LIMIT:-240}")" python -m benchmarks.run "${THROUGHPUT[@]}" \
    --allow-busy --data-dir "$DATA_DIR" --out "$OUT/throughput" --no-tta > "$OUT/throughput.log" 2>&1 || status=$?
tail -n 40 "$OUT/throughput.log"
exit $status
