#!/usr/bin/env bash
# The CUDA checks (tests/test_gpu.py) on a machine with a GPU: `make gpu-check`, or on a bare GPU
# machine with no network, `bash scripts/gpu_check.sh` after scripts/gpu_wheels.sh has put this
# project's pinned libraries in .whl/ beside it (GPU_WHEELS names that folder; empty: none) and
# the tiny models' tokenizer in .gpu-cache/ (used as a fresh LORACOMBENCH_CACHE when present).
# Refuses to run where there is no CUDA device, since every test there would only skip, and stops
# pytest after GPU_CHECK_TIMEOUT seconds (default 300), so that a hang cannot use up a device
# lease. Extra arguments go to pytest. Run it under `set -o pipefail` when piping it to tee.
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
if [ -d .gpu-cache ]; then
  cache=$(mktemp -d)
  cp -r .gpu-cache/. "$cache"
  export LORACOMBENCH_CACHE="$cache"
fi
export HF_HUB_OFFLINE=1  # the tests use no hub; a lookup must fail at once, not time out
"$PYTHON" - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("gpu-check: no CUDA device here; tests/test_gpu.py would only skip")
print(f"gpu-check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}", flush=True)
try:  # every test builds a tiny model on this tokenizer: fail once, clearly, rather than 8 times
    from loracombench.models import tiny_tokenizer

    tiny_tokenizer()
except Exception as err:
    sys.exit(f"gpu-check: the tiny models' tokenizer cannot be loaded ({err}); run scripts/gpu_wheels.sh "
             "where the project is installed and carry .gpu-cache/")
PY
exec timeout "${GPU_CHECK_TIMEOUT:-300}" "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_gpu.py "$@"
