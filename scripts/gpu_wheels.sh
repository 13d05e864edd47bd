#!/usr/bin/env bash
# Wheels for scripts/gpu_check.sh on a GPU machine that has PyTorch but cannot download: the
# libraries whose pinned versions (those in this checkout's .venv) such an image may lack or hold
# in another version. Pure-Python wheels, plus pydantic-core for CPython $GPU_PYTHON on x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GPU_PYTHON=${GPU_PYTHON:-3.12}
pins=$("$PY" -c "import importlib.metadata as m; print(' '.join(f'{n}=={m.version(n)}' for n in [
    'transformers', 'peft', 'pydantic', 'pydantic-core', 'annotated-types', 'typing-inspection',
    'typing-extensions', 'regex']))")
# .whl/ is this script's own folder: it replaces earlier wheels, but nothing else put there.
if [ -e .whl ] && find .whl -mindepth 1 ! -name '*.whl' | grep -q .; then
  echo "gpu_wheels.sh: .whl/ holds files other than wheels; move them away first" >&2
  exit 2
fi
rm -f .whl/*.whl && mkdir -p .whl
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $pins
ls .whl
