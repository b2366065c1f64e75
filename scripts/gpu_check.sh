#!/usr/bin/env bash
# One-call GPU check for a session with a lent GPU. The device image has python3 3.12 with jax (CUDA), flax,
# optax, orbax and torch but no network; the other packages travel as wheels in .wheels/ (ignored by git), made
# here with `--download`; the real inputs are the repository's tests/data:
#   here:    bash scripts/gpu_check.sh --download
#   device:  run(command="bash scripts/gpu_check.sh", carry=[".wheels"], timeout_s=540)
# Stages, each with its own time limit (the whole finishes in under 8 minutes), tables in $OUT (or out/):
#   1. parity tests on the GPU: tests/test_dream.py (fp32 against PyTorch at the highest matmul precision, and
#      the bf16 checks) and tests/test_sampler.py (tokens identical to the reference loop; its mesh test needs
#      the fake CPU devices and is left out),
#   2. bf16 forward: ours (XLA and cuDNN attention) against our PyTorch module (SDPA), `small` and a
#      Dream-7B-shaped slice (scripts/gpu_check.py --part forward),
#   3. the sampler on the 7B-shaped slice, batch 1 and 8, exact and prefix cache (--part sampler),
#   4. one training update of the 7B-shaped slice, sequence 3072, with MFU (scripts/bench_train.py),
#   5. requests per second of the six tasks through the pipeline, `small` config (scripts/bench_tasks.py).
# `bash scripts/gpu_check.sh sampler tasks` runs only the stages named (parity forward sampler train tasks).
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--download" ]]; then
  platforms=()
  for p in manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux2014 manylinux1; do
    platforms+=(--platform "${p}_x86_64")
  done
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform any -d .wheels \
    ml_collections grain array-record portpicker soundfile cffi pycparser soxr
  exit
fi
out="${OUT:-out}"
mkdir -p "$out"
site=/tmp/omnidiff_site
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .wheels/*.whl \
  && python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" . \
  || { echo "install failed"; exit 1; }
# -P below keeps the source tree's omnidiff_jax/ (which lacks the installed convert/ and configs/ subpackages)
# off sys.path, so python imports the installed package.
export PYTHONPATH="$site" JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', \
optax.__version__, 'torch', torch.__version__, jax.devices())"

stages=" ${*:-parity forward sampler train tasks} "
stage() {  # stage NAME SECONDS COMMAND...: runs one stage under its own limit, logs to $out/NAME.txt
  local name=$1 limit=$2; shift 2
  [[ "$stages" == *" $name "* ]] || return 0
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt" || echo "=== $name: failed or timed out (limit ${limit}s)"
}
stage parity 140 python3 -P -m pytest tests/test_dream.py tests/test_sampler.py -k "not mesh" -q -p no:cacheprovider
stage forward 90 python3 scripts/gpu_check.py --part forward --json "$out/gpu_forward.json"
stage sampler 70 python3 scripts/gpu_check.py --part sampler --json "$out/gpu_sampler.json"
stage train 150 python3 scripts/bench_train.py --config omni_diffusion_7b --layers 4 --seq-len 3072 --packs 1 \
  --bf16 --remat none dots full --no-torch --reps 3 --json "$out/gpu_train.json"
stage tasks 130 python3 scripts/bench_tasks.py --json "$out/gpu_tasks.json"
echo "=== done ($(date +%T))"
