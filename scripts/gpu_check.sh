#!/usr/bin/env bash
# A prepared check for a GPU machine (about 5 minutes once the wheels are cached):
#   1. fails at once (exit 2) when no NVIDIA GPU is visible (nvidia-smi),
#   2. installs fpn_tf with the GPU extra ('.[and-cuda]': tensorflow[and-cuda] 2.21) into a fresh
#      venv ($GPU_CHECK_VENV, default .venv-gpu-check; reused when it already has TF with CUDA)
#      and fails if tensorflow-cpu ended up in it,
#   3. runs bench/gpu_check.py: TF must see the GPUs; R50-FPN at 800x1333 trains a few dozen steps
#      under MirroredStrategy with XLA in mixed_float16 and float32 (and mixed_float16 without XLA);
#      images/s per GPU, inference latency at batch 1 and 8, peak GPU memory, and mixed_float16
#      detections against float32 on the same weights. Figures go to gpu_check.json.
# Extra arguments go to bench/gpu_check.py (e.g. --steps=40 --batch_per_gpu=4).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU visible on this machine (nvidia-smi missing or lists none); nothing to check." >&2
  exit 2
fi
nvidia-smi -L

VENV=${GPU_CHECK_VENV:-.venv-gpu-check}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import tensorflow as tf, sys; sys.exit(0 if tf.test.is_built_with_cuda() else 1)" 2>/dev/null; then
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/pip" install -q -e '.[and-cuda]'
fi
if "$VENV/bin/pip" show tensorflow-cpu >/dev/null 2>&1; then
  echo "gpu_check: tensorflow-cpu is installed in $VENV beside tensorflow[and-cuda]; use a fresh venv" >&2
  exit 1
fi
"$VENV/bin/pip" show tensorflow | sed -n '1,2p'

export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
exec "$VENV/bin/python" bench/gpu_check.py --output gpu_check.json "$@"
