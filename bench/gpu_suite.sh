#!/usr/bin/env bash
# The GPU suite: everything preftune checks and measures on a GPU, in one run of a few minutes.
#
#   bash bench/gpu_suite.sh                  # from the repository root, on a machine with a GPU
#   OUT=runs/gpu-suite bash bench/gpu_suite.sh
#
# Writes into $OUT (default runs/gpu-suite): checks.md/json (bf16 agreement, every layout on
# every attention kernel the GPU has, flash-attention packing, FSDP2 on the one GPU, 4-bit
# QLoRA: bench/gpu_checks.py), compare_trl.txt (preftune against TRL's DPOTrainer on a ~0.45B
# Llama built from config, bf16, with MFU: bench/compare_trl.py) and data_prep.txt (reading and
# tokenizing 200,000 pairs: bench/data_prep.py). Packages the machine lacks are installed from
# wheels in .whl/ when that folder exists (bench/gpu_wheels.sh fetches them). Without a GPU, CI
# checks this script's syntax and runs bench/gpu_checks.py --device cpu --quick.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-suite}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}  # bf16 dense peak of an H100/H200 SXM, for MFU
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt" || true
python3 bench/gpu_checks.py --out "$OUT/checks.json" | tee "$OUT/checks.md" || true
python3 bench/compare_trl.py --rounds 1 --pairs 64 --hidden 1024 --layers 24 \
  --peak-tflops "$PEAK_TFLOPS" | tee "$OUT/compare_trl.txt" || true
python3 bench/data_prep.py --pairs 200000 | tee "$OUT/data_prep.txt" || true
