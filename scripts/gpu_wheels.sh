#!/usr/bin/env bash
# What scripts/gpu_check.sh needs on a GPU machine that has PyTorch but cannot download:
# - .whl/: the libraries whose pinned versions (those in this checkout's .venv) such an image may
#   lack or hold in another version. Pure-Python wheels, plus pydantic-core and regex for CPython
#   $GPU_PYTHON on x86-64;
# - .gpu-cache/: the SmolLM2 tokenizer the tiny test models use (3 MB). Without it they rebuild it
#   from the embedded GGUF, whose package (94 MB) and gguf such a machine does not have.
# Carry both: run(command=..., carry=[".whl", ".gpu-cache"]).
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
# .gpu-cache/ is this script's too: only its tokenizer folder is replaced.
"$PY" -c "from loracombench.models import tiny_tokenizer; tiny_tokenizer()"
tokenizer=$("$PY" -c "from loracombench.models import cache_dir; print(cache_dir() / 'smollm2-tokenizer')")
mkdir -p .gpu-cache && rm -rf .gpu-cache/smollm2-tokenizer && cp -r "$tokenizer" .gpu-cache/smollm2-tokenizer
ls .gpu-cache
