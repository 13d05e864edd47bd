"""Oracle routing: every example goes to its own task's expert.

Not a method a user can deploy (it is told each test example's task); it is the upper bound of
any router over these experts, and retains exactly 100% of each expert by construction."""

from __future__ import annotations

from pathlib import Path

from .base import BuildInputs, Composed, Composition, Needs, RoutedAdapters
from .experts import EXPERTS_FILE, load_experts, save_experts


class OracleRouting(Composition):
    name = "route_oracle"
    artefacts = (EXPERTS_FILE,)
    paper = "the routing upper bound used by e.g. LoraRetriever (Zhao et al., 2024, arXiv:2402.09997)"

    def needs(self) -> Needs:
        return Needs(task_label_at_inference=True)

    def build(self, inputs: BuildInputs, out_dir: Path) -> dict:
        save_experts(out_dir, inputs.experts)
        return {"routes": sorted(inputs.experts)}

    def load(self, out_dir: Path) -> Composed:
        return RoutedAdapters(load_experts(out_dir), lambda task, prompts: [task.name] * len(prompts))
