#!/usr/bin/env bash
# The main job on a fresh machine: install fpn_tf into .venv, then
#   1. train configs/demo.yaml on the synthetic shapes dataset (written on first use),
#   2. evaluate the checkpoint on the held-out split with pycocotools,
#   3. export a SavedModel in TF Serving's layout (saved_models/demo/<version>/),
#   4. predict on a held-out image with the SavedModel (JSON + PNG with boxes).
# Extra arguments go to scripts/train.py (e.g. --train_steps=200 for a quick look).
# TensorFlow comes from the extra in FPN_TF_EXTRA: cpu (default) or and-cuda (GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
FPN_TF_EXTRA=${FPN_TF_EXTRA:-cpu}
.venv/bin/pip install -q -e ".[${FPN_TF_EXTRA}]" 2>&1 | grep -v "^WARNING: Location" || true
PY=.venv/bin/python
MODEL_DIR=${MODEL_DIR:-runs/demo}
export FPN_TF_CACHE=${FPN_TF_CACHE:-$PWD/runs/cache}

$PY scripts/train.py --config configs/demo.yaml --model_dir "$MODEL_DIR" "$@"
$PY scripts/evaluate.py --model_dir "$MODEL_DIR"
$PY scripts/export.py --model_dir "$MODEL_DIR" --export_dir saved_models --name demo
# A glob, not `ls | head`: under pipefail, head closing the pipe early can kill ls with
# SIGPIPE (exit 141) and stop the script after the export.
IMAGES=("$FPN_TF_CACHE"/synthetic/*/val/images/*.png)
IMAGE=${IMAGES[0]}
$PY scripts/predict.py --saved_model saved_models/demo --inputs "$IMAGE" --output_dir "$MODEL_DIR/predictions"
echo "demo done: metrics in $MODEL_DIR, SavedModel in saved_models/demo, predictions in $MODEL_DIR/predictions"
