"""Arrow's prototypes, decided once per prompt: a weights-only router that sends a whole example
to one expert.

Arrow (Ostapenko et al., 2024, arXiv:2405.11157) gives each expert e, in every adapted linear
layer, a prototype v_e: the top right singular vector of its update ΔW_e = B_e·A_e, the input
direction the expert changes most. It routes each token in each layer by |⟨x, v_e⟩|. Here the
same logits decide the whole prompt instead: the base model reads the prompt once, every
(token, adapted layer) pair votes for the expert with the largest |⟨x, v_e⟩| (Arrow with
top_k = 1), and the prompt goes to the expert with the most votes; ties go to the expert listed
first. The routed example is then scored by that expert alone. The aggregation is this
benchmark's variant, not the paper's.

Why a sequence-level variant: token-level Arrow (`route_arrow`) mixes both experts into every
example, and with experts trained on a one-word label and on long solutions the mix loses much
of the GSM8K expert. Routing once per prompt keeps each expert intact when the vote is right,
and needs nothing beyond the experts' weights and one base forward pass over each prompt.
Why prototypes rather than raw update norms ‖ΔW_e·x‖ (the activation-norm routing of SpectR and
SEQR, Fleshman & Van Durme 2025, arXiv:2509.18093): raw norms favour the expert whose updates are
larger whatever the input, which is why SEQR calibrates them; a unit prototype compares
directions only.

Each prompt is read alone (batch of one), so its route cannot depend on the other prompts of
the stream: padding would change its floating-point sums.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import adapters, io
from ..evaluation import encode, model_device
from ..merging.ops import svd_of_product
from .arrow_router import check_same_modules
from .base import BuildInputs, Composed, Composition, Needs, RoutedAdapters
from .experts import EXPERTS_FILE, load_experts, save_experts

PROTOTYPES_FILE = "prototypes.safetensors"
SETTINGS_FILE = "arrow_sequence.json"


def prototype(factors) -> torch.Tensor:
    """The unit top right singular vector of B·A (its sign is arbitrary: routing uses |⟨x, v⟩|);
    zero for a zero update (a fresh LoRA's B), which has no direction to route by."""
    _, singular, vh = svd_of_product(factors.lora_B.double(), factors.lora_A.double())
    if not singular.numel() or singular[0] == 0:
        return torch.zeros(factors.lora_A.shape[1])
    return vh[0].float()


def votes(inputs: dict[str, torch.Tensor], prototypes: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per expert, how many (token, layer) pairs have it as their top-1 Arrow expert.

    inputs: module -> its inputs (tokens × in_features); prototypes: module -> (experts × in).
    A module that no expert changes (every prototype zero) casts no vote: its logits all tie at
    zero, and argmax would hand each of its tokens to the first expert."""
    counts = torch.zeros(next(iter(prototypes.values())).shape[0], dtype=torch.long)
    for module, stacked in prototypes.items():
        if not stacked.any():
            continue
        logits = (inputs[module] @ stacked.T).abs()
        counts += torch.bincount(logits.argmax(dim=1), minlength=stacked.shape[0])
    return counts


class ArrowSequenceRouting(Composition):
    name = "route_arrow_sequence"
    artefacts = (SETTINGS_FILE, EXPERTS_FILE)
    paper = ("Arrow's prototypes (Ostapenko et al., 2024, arXiv:2405.11157), one top-1 vote per token and layer, "
             "the prompt routed by majority (sequence-level aggregation: this benchmark's variant)")

    def needs(self) -> Needs:
        return Needs(routing_forward=True)

    def build(self, inputs: BuildInputs, out_dir: Path) -> dict:
        if len(inputs.experts) < 2:
            raise ValueError(f"composition {self.name!r} routes between at least two experts, "
                             f"got {sorted(inputs.experts)}")
        loaded = check_same_modules(self.name, inputs.experts)
        modules = sorted(next(iter(loaded.values())).factors)
        stacked = {m: torch.stack([prototype(a.factors[m]) for a in loaded.values()]) for m in modules}
        save_file({m: t.contiguous() for m, t in stacked.items()}, str(out_dir / PROTOTYPES_FILE))
        io.write_json(out_dir / SETTINGS_FILE, {"experts": list(inputs.experts), "modules": modules})
        save_experts(out_dir, inputs.experts)
        silent = {task: sum(not bool(stacked[m][i].any()) for m in modules) for i, task in enumerate(inputs.experts)}
        return {"router": "arrow prototypes, majority vote per prompt", "modules": len(modules),
                "modules_without_update": silent}

    def load(self, out_dir: Path) -> Composed:
        settings = io.read_json(out_dir / SETTINGS_FILE)
        experts = load_experts(out_dir)
        if list(experts) != settings["experts"]:
            raise ValueError(f"{out_dir}: {SETTINGS_FILE} names the experts {settings['experts']}, "
                             f"{EXPERTS_FILE} {list(experts)}; rebuild it")
        prototypes = load_file(str(out_dir / PROTOTYPES_FILE))
        if sorted(prototypes) != sorted(settings["modules"]):
            raise ValueError(f"{out_dir}: {PROTOTYPES_FILE} does not hold the prototypes of the modules "
                             f"{SETTINGS_FILE} names; rebuild it")
        return PrototypeRouted(experts, prototypes)


class PrototypeRouted(RoutedAdapters):
    """Each prompt scored by the expert its prototypes' vote picks on the base model."""

    def __init__(self, experts: dict[str, Path], prototypes: dict[str, torch.Tensor]):
        super().__init__(experts, router=None)
        self.prototypes = prototypes

    def routes(self, task, prompts: list[str], shared) -> list[str]:
        names = list(self.adapters)
        with shared.borrowed() as loaded:
            return [names[int(self.vote(loaded, prompt).argmax())] for prompt in prompts]

    def vote(self, loaded, prompt: str) -> torch.Tensor:
        """The votes of one prompt, read alone by the base model."""
        model = loaded.model
        captured: dict[str, torch.Tensor] = {}

        def keep(name):
            return lambda module, args: captured.__setitem__(name, args[0][0].detach().float().cpu())

        ids = encode(loaded.tokenizer, prompt)
        if not ids:
            raise ValueError("route_arrow_sequence: an empty prompt has no tokens to vote")
        hooks = [model.get_submodule(name).register_forward_pre_hook(keep(name)) for name in self.prototypes]
        try:
            model.eval()
            with torch.inference_mode():
                model(input_ids=torch.tensor([ids], device=model_device(model)), logits_to_keep=1)
        finally:
            for hook in hooks:
                hook.remove()
        return votes(captured, self.prototypes)
