"""Arrow: token-level, training-free routing between the experts, with PEFT's implementation.

Arrow (Ostapenko et al., 2024, "Towards Modular LLMs by Building and Reusing a Library of LoRAs",
arXiv:2405.11157) needs nothing but the experts' weights. In every adapted linear layer, expert
e's prototype v_e is the top right singular vector of its update ΔW_e = B_e·A_e: the input
direction the expert changes most. Each token's input x to that layer is routed by the logits
|⟨x, v_e⟩| (absolute: a singular vector's sign is arbitrary); the top_k experts are kept, their
logits divided by the temperature and softmaxed into coefficients c_e, and the layer computes
W·x + Σ_e c_e·s_e·B_e·A_e·x. So routing is per token and per layer, and decided from the
hidden state alone: there is no task label and no router to train.

PEFT 0.21 (`ArrowConfig`, `create_arrow_model`) finds v_e by 15 steps of power iteration from a
random start; its rng_seed fixes that start, and we pass the build's seed so that a rebuild
routes identically. General-knowledge subtraction (GenKnowSub, `use_gks`: subtracting the mean of
adapters trained on general text before routing) is off: there are no general adapters here.

Parameters and PEFT's defaults: top_k (PEFT: 3) and temperature (PEFT's router_temperature: 1.0),
both kept as defaults. With fewer experts than top_k every expert is kept: the top k of fewer than
k is all of them, and PEFT's own top-k would fail, so it gets min(top_k, experts). With top_k = 1
(or one expert) each token takes exactly one expert's whole update and the temperature has no
effect; above that the temperature sets how evenly the kept experts are mixed.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

from .. import adapters, io
from .base import ONLY_ROUTE, BuildInputs, Composed, Composition, check_params
from .experts import EXPERTS_FILE, load_experts, save_experts

SETTINGS_FILE = "arrow.json"
DEFAULTS = {"top_k": 3, "temperature": 1.0}  # PEFT's ArrowConfig defaults (top_k, router_temperature)


class ArrowRouting(Composition):
    name = "route_arrow"
    artefacts = (SETTINGS_FILE, EXPERTS_FILE)
    paper = "Arrow (Ostapenko et al., 2024, arXiv:2405.11157), PEFT's ArrowConfig/create_arrow_model"

    def __init__(self, **params):
        self.params = check_params(self.name, params, DEFAULTS)
        top_k, temperature = self.params["top_k"], self.params["temperature"]
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"composition {self.name!r}: top_k must be an integer >= 1 (experts mixed per token), "
                             f"got {top_k!r}; PEFT's default {DEFAULTS['top_k']}")
        if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                or not math.isfinite(temperature) or temperature <= 0):
            raise ValueError(f"composition {self.name!r}: temperature must be a finite number > 0, got "
                             f"{temperature!r}; PEFT's default {DEFAULTS['temperature']}")

    def build(self, inputs: BuildInputs, out_dir: Path) -> dict:
        check_routable(self.name, inputs.experts)
        settings = {"top_k": min(self.params["top_k"], len(inputs.experts)),
                    "temperature": float(self.params["temperature"]), "rng_seed": inputs.seed}
        save_experts(out_dir, inputs.experts)
        io.write_json(out_dir / SETTINGS_FILE, settings)
        return {"router": "arrow", "top_k_used": settings["top_k"], "rng_seed": inputs.seed,
                "general_knowledge_subtraction": False}

    def load(self, out_dir: Path) -> Composed:
        return ArrowModel(load_experts(out_dir), io.read_json(out_dir / SETTINGS_FILE))


class ArrowModel(Composed):
    """One route: every example is scored by the Arrow model, which routes inside each layer."""

    def __init__(self, experts: dict[str, Path], settings: dict):
        self.experts, self.settings = experts, settings

    def assign(self, task, prompts: list[str], shared) -> list[str]:
        return [ONLY_ROUTE] * len(prompts)

    @contextlib.contextmanager
    def open(self, route: str, shared):
        from peft import ArrowConfig, create_arrow_model

        with shared.borrowed() as loaded:
            for path in self.experts.values():
                adapters.read_config(path)  # a missing folder would otherwise be looked up on the hub
                adapters.check_adapter_base(path, loaded)
            try:
                config = ArrowConfig(top_k=self.settings["top_k"], router_temperature=self.settings["temperature"],
                                     use_gks=False, rng_seed=self.settings["rng_seed"])
                yield create_arrow_model(loaded.model, [str(p) for p in self.experts.values()], config).eval()
            finally:
                # PEFT marks the wrapped model with its adapters' configs; SharedBase.restore unwraps
                # the layers but not the mark, and the next Arrow build would find its names taken.
                if hasattr(loaded.model, "peft_config"):
                    del loaded.model.peft_config


def check_same_modules(name: str, experts: dict[str, Path]) -> dict:
    """The experts read (task -> adapters.Adapter), refused unless they share base and modules:
    Arrow compares the experts layer by layer."""
    if not experts:
        raise ValueError(f"composition {name!r} needs at least one expert")
    loaded = {task: adapters.read_adapter(path) for task, path in experts.items()}
    adapters.check_same_base(list(loaded.values()))
    (first, reference), *others = loaded.items()
    for task, adapter in others:
        differing = sorted(set(adapter.factors) ^ set(reference.factors))
        if differing:
            raise ValueError(f"composition {name!r}: the experts of {first} and {task} adapt different modules "
                             f"(e.g. {differing[0]}); Arrow needs the same modules in every expert")
    return loaded


def check_routable(name: str, experts: dict[str, Path]) -> None:
    """PEFT's Arrow stacks the experts' factors layer by layer: same base, same modules, same ranks."""
    loaded = check_same_modules(name, experts)
    (first, reference), *others = loaded.items()
    for task, adapter in others:
        ranks = {m: (f.rank, adapter.factors[m].rank) for m, f in reference.factors.items()
                 if f.rank != adapter.factors[m].rank}
        if ranks:
            module, (r_first, r_task) = next(iter(ranks.items()))
            raise ValueError(f"composition {name!r}: the experts of {first} and {task} differ in rank at "
                             f"{module} ({r_first} vs {r_task}); Arrow needs equal ranks module by module")
