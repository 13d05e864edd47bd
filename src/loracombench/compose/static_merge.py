"""Static merges as compositions: every method of merging/ produces one adapter, scored alone.

The merge itself is a pure tensor function (merging/<method>.py names its paper); this module
only runs it on the experts' saved adapters and points the evaluator at the result."""

from __future__ import annotations

from pathlib import Path

from .. import adapters
from .base import BuildInputs, Composed, Composition, OneModel

ADAPTER_DIR = "adapter"


class StaticMerge(Composition):
    name = "static_merge"
    paper = "per method: see merging/<method>.py"

    def __init__(self, method: str, weights: list[float] | None = None, params: dict | None = None):
        from ..merging import get_method, parse_params

        # An unknown method or parameter fails here. Typed, with defaults filled in, so that lam: 1
        # and lam: 1.0, or a default given and left out, make one cache key.
        typed = parse_params(get_method(method), params or {})
        self.params = {"method": method, "weights": weights, "params": typed}

    def build(self, inputs: BuildInputs, out_dir: Path) -> dict:
        metadata = adapters.merge_adapter_dirs(list(inputs.experts.values()), self.params["method"],
                                               out_dir / ADAPTER_DIR, self.params["weights"], self.params["params"])
        return {"info": metadata["info"]}

    def load(self, out_dir: Path) -> Composed:
        return OneModel(out_dir / ADAPTER_DIR)
