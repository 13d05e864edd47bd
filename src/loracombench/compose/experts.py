"""Where a built composition finds its experts: their folders, stored relative to the build folder.

Relative paths, because the run folder may move (to another disk, another machine); every method
that routes to the experts' own folders (rather than writing a merged adapter) keeps them here."""

from __future__ import annotations

import os
from pathlib import Path

from .. import io

EXPERTS_FILE = "experts.json"


def save_experts(out_dir: Path, experts: dict[str, Path]) -> None:
    io.write_json(out_dir / EXPERTS_FILE, {task: os.path.relpath(path, out_dir) for task, path in experts.items()})


def load_experts(out_dir: Path) -> dict[str, Path]:
    return {task: out_dir / path for task, path in io.read_json(out_dir / EXPERTS_FILE).items()}
