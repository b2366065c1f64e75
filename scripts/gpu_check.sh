#!/usr/bin/env bash
# One-call GPU check for a session with a lent GPU (no network there: jax, flax, optax, orbax and torch are
# preinstalled; other wheels travel in .wheels/, made here with `scripts/gpu_check.sh --download`).
#   here:    bash scripts/gpu_check.sh --download
#   device:  run(command="bash scripts/gpu_check.sh", carry=[".wheels"], timeout_s=480)
# Runs the parity tests on the GPU (fp32), scripts/gpu_check.py (bf16 attention backends, forward timings), the
# training MFU of a Dream-7B-shaped slice (full width, 4 layers, sequence 3072) and the sampler on a 7B-shaped
# slice; prints tables. Each stage has its own time limit; the whole finishes in under 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--download" ]]; then
  pip download --only-binary=:all: --python-version 3.11 -d .wheels \
    ml_collections grain soxr soundfile safetensors ml_dtypes transformers tqdm pytest
  exit 0
fi
out="${OUT:-out}"
mkdir -p "$out"
pip install --quiet --no-index --find-links .wheels --no-deps -e . 2>&1 | tail -2 || true
pip install --quiet --no-index --find-links .wheels ml_collections grain soxr soundfile safetensors tqdm pytest \
  2>&1 | tail -2 || true
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
export JAX_PLATFORMS=cuda
timeout 120 python -m pytest tests/test_dream.py -q -x 2>&1 | tail -5 | tee "$out/gpu_parity.txt"
timeout 150 python scripts/gpu_check.py --json "$out/gpu_check.json" || echo "gpu_check.py: failed or timed out"
timeout 120 python scripts/bench_train.py --config omni_diffusion_7b --layers 4 --seq-len 3072 --packs 1 --bf16 \
  --remat full --no-torch --reps 3 --json "$out/gpu_train.json" || echo "bench_train.py: failed or timed out"
