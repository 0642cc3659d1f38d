#!/usr/bin/env bash
# Creates .venv (if missing), installs fpn_tf with its test extras, runs ruff and the test suite.
# TensorFlow comes from the extra in FPN_TF_EXTRA: cpu (default: tensorflow-cpu, small) or
# and-cuda (tensorflow[and-cuda], for a GPU machine). Never both in one venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
FPN_TF_EXTRA=${FPN_TF_EXTRA:-cpu}
# openvino (which includes the onnx extra): the portable-export tests run the real runtimes.
.venv/bin/pip install -q -e ".[${FPN_TF_EXTRA},test,openvino]"
# gRPC request building (scripts/serving_client.py): --no-deps, or it pulls the full
# `tensorflow` beside tensorflow-cpu. Its own needs (grpcio, protobuf) come with TF.
.venv/bin/pip install -q --no-deps tensorflow-serving-api==2.21.0
.venv/bin/ruff check fpn_tf scripts tests bench examples
exec .venv/bin/python -m pytest -q tests "$@"
