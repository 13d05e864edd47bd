"""Oracle routing: every example goes to its own task's expert.

Not a method a user can deploy (it is told each test example's task); it is the upper bound of
any router over these experts, and retains exactly 100% of each expert by construction."""

from __future__ import annotations

import os
from pathlib import Path

from .. import io
from .base import BuildInputs, Composed, Composition, Needs, RoutedAdapters

ROUTES_FILE = "routes.json"


class OracleRouting(Composition):
    name = "route_oracle"
    artefacts = (ROUTES_FILE,)
    paper = "the routing upper bound used by e.g. LoraRetriever (Zhao et al., 2024, arXiv:2402.09997)"

    def needs(self) -> Needs:
        return Needs(task_label_at_inference=True)

    def build(self, inputs: BuildInputs, out_dir: Path) -> dict:
        # Relative paths: the run folder may move (to another disk, another machine).
        io.write_json(out_dir / ROUTES_FILE, {task: os.path.relpath(path, out_dir)
                                              for task, path in inputs.experts.items()})
        return {"routes": sorted(inputs.experts)}

    def load(self, out_dir: Path) -> Composed:
        experts = {task: out_dir / path for task, path in io.read_json(out_dir / ROUTES_FILE).items()}
        return RoutedAdapters(experts, lambda task, prompts: [task.name] * len(prompts))
