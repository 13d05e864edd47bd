#!/usr/bin/env bash
# The CUDA checks (tests/test_gpu.py) on a machine with a GPU: `make gpu-check`, or on a bare GPU
# machine with no network, `bash scripts/gpu_check.sh` after scripts/gpu_wheels.sh has put this
# project's pinned libraries in .whl/ beside it (GPU_WHEELS names that folder; empty: none). Refuses to run where there is no CUDA device,
# since every test there would only skip. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
GPU_WHEELS=${GPU_WHEELS-.whl}
if [ -n "$GPU_WHEELS" ] && compgen -G "$GPU_WHEELS/*.whl" >/dev/null; then
  site=$(mktemp -d)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$GPU_WHEELS"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("gpu-check: no CUDA device here; tests/test_gpu.py would only skip")
print(f"gpu-check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}", flush=True)
PY
exec "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_gpu.py "$@"
