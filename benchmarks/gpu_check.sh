#!/usr/bin/env bash
# The GPU checks of torch_tq, for a CUDA machine with torch, pyarrow, xxhash and pytest
# installed (no network needed): builds the extension in place, runs the GPU tests and the
# client/queue tests, and measures the pinned host-to-device path (benchmarks/gpu_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
python3 -c "import sys, torch, pyarrow; print(sys.version.split()[0], torch.__version__, pyarrow.__version__)"
python3 setup.py -q build_ext --inplace
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m pytest -q -p no:cacheprovider tests/test_client.py tests/test_queue.py "$@"
python3 benchmarks/gpu_check.py
