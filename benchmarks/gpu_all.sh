#!/usr/bin/env bash
# Every GPU check in one prepared run, for a device lease of a few minutes:
#   1. mlp and cnn under the single, pmap, sharded and fsdp strategies (benchmarks/gpu_strategies.py)
#   2. memory per device and step time of a wide MLP (784-4096-4096-10, Adam) under single,
#      sharded and fsdp (benchmarks/strategy_memory.py). One H200 is one device: every
#      strategy then runs on that one device, so the memory per device is the single-device
#      figure under all three, and what this phase shows is the step time of each program.
#      fsdp's 1/N memory per device needs N > 1 devices (a multi-GPU machine, or fake CPU
#      devices, which show the memory but not the speed: docs/parallel.md).
#   3. the benchmark suite (benchmarks/gpu.sh: CNN to 99% cold and warm, throughput)
# Results land in a temporary folder and come back as one archive, $OUT/gpu_results.tgz
# (the device tool returns at most 8 files).
#
#   OUT=/some/folder DATA_DIR=folder/holding/MNIST bash benchmarks/gpu_all.sh
#
# Phase limits (seconds): STRATEGY_LIMIT (default 100), MEMORY_LIMIT (60), TTA_LIMIT (each of
# two, 120: CNN to 99% over SEEDS, default 0-9; every finished run is written as it ends, so a
# cut phase keeps its seeds so far), THROUGHPUT_LIMIT (160): about 9.5 minutes at most in all.
set -u
: "${OUT:?set OUT to the folder that receives gpu_results.tgz}"
DATA_DIR=${DATA_DIR:-.gpu_data}
RES=$(mktemp -d)
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p "$OUT"
pack() { tar czf "$OUT/gpu_results.tgz" -C "$RES" . ; }
trap pack EXIT

timeout "${STRATEGY_LIMIT:-100}" python benchmarks/gpu_strategies.py --data-dir "$DATA_DIR" \
    --out "$RES/strategies" > "$RES/strategies.log" 2>&1
echo "strategies: exit $?"
tail -n 20 "$RES/strategies.log"
pack
timeout "${MEMORY_LIMIT:-60}" python benchmarks/strategy_memory.py --out "$RES/strategy_memory" \
    > "$RES/strategy_memory.log" 2>&1
echo "strategy memory: exit $?"
tail -n 12 "$RES/strategy_memory.log"
pack
OUT="$RES/suite" DATA_DIR="$DATA_DIR" TTA_LIMIT="${TTA_LIMIT:-120}" \
    THROUGHPUT_LIMIT="${THROUGHPUT_LIMIT:-160}" bash benchmarks/gpu.sh
echo "suite: exit $?"
