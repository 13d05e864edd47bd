"""LoRA Soups, the CAT method: Prabhakar, Li, Narasimhan, Kakade, Malach, Jelassi 2024, "LoRA Soups:
Merging LoRAs for Practical Skill Composition Tasks", arXiv 2410.13025 (COLING 2025 industry track).

The experts are concatenated and weighted per layer, ΔW_l = Σᵢ α_{i,l}·sᵢ·B_{i,l}A_{i,l}, and only the
α are trained, by gradient descent on labelled examples of every task (mixed, shuffled); the base
model and every LoRA factor stay frozen. The result is stored exactly as one PEFT adapter of rank
Σ rᵢ with α folded into B, so it is scored like any static merge.

Choices, read from the paper and its reference code (github.com/aksh555/LoRA-Soups, as mirrored in
valteu/LoRA-Soups and cited by microsoft/mttl's LoraSoupSelector):
- "Layer" is each adapted module: the reference code holds one weight per adapter in every LoRA
  layer (q_proj and v_proj of a block have their own), not one per transformer block.
- weighting="softmax" (default): α_{·,l} = softmax of learnable logits, as the reference code does, so
  the weights of a module sum to 1. weighting="free": α is the raw learnable weight, as the paper's
  equation writes it.
- init="equal" (default): equal weights at the start, so that CAT starts exactly at task arithmetic
  with equal weights (1/n under softmax; 1 under free, the plain sum). init="random" draws the
  softmax logits from N(0, 1) with the seed, as the reference code does (softmax only).
- AdamW without weight decay, as the reference (transformers' Trainer, adamw_torch), with the
  linear decay our experts train with and no warm-up. The reference (train_cat.sh, cat_train.py)
  uses lr 1e-4 over one epoch of 9,880 examples at an effective batch of 6 (batch_size 10 over
  micro-batches of 6 accumulates nothing), about 1,650 steps, after 100 warm-up steps, in fp16;
  with a few hundred examples that rate moves no weight, hence a larger default rate.
- The loss is the experts' own: mean cross-entropy of the target tokens of each batch. The
  reference's covers the prompt tokens too (train_on_inputs=True), with the experts' dropout on
  (model.train(); 0.1 in its adapters); here the model runs in eval mode, so only α changes.
- The reference fits α on a 10k-row mix of the skills' training data; here on validation rows of
  every task (n_validation per task), never on test.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import adapters, io
from ..config import MAX_SEED, TrainSettings
from ..evaluation import model_device
from ..merging.factors import LoraFactors
from ..merging.ops import concat_factors
from ..tasks import get_task
from ..distributed import World
from ..training import Example, Trainer, encode_rows, micro_batches, planned_batches
from .base import BuildInputs, Composed, Composition, Needs, OneModel, check_params
from .static_merge import ADAPTER_DIR

WEIGHTS_FILE = "cat_weights.json"
LOSS_CURVE_FILE = "loss_curve.json"
FALLBACK_MAX_LENGTH = 320
WEIGHTINGS = ("softmax", "free")
INITS = ("equal", "random")


class CatLayer(torch.nn.Module):
    """One adapted module: Σᵢ αᵢ·sᵢ·Bᵢ(Aᵢx) as one concatenated pair of frozen factors, with each
    expert's columns of B multiplied by its weight (one matmul pair, whatever the number of experts)."""

    def __init__(self, factors: list[LoraFactors], weighting: str, logits: torch.Tensor):
        super().__init__()
        joined = concat_factors(factors, [1.0] * len(factors))  # sᵢ folded into Bᵢ
        self.register_buffer("lora_A", joined.lora_A.clone())
        self.register_buffer("lora_B", joined.lora_B.clone())
        self.register_buffer("ranks", torch.tensor([f.rank for f in factors]))
        self.weighting = weighting
        self.logits = torch.nn.Parameter(logits.clone().float())

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=0) if self.weighting == "softmax" else self.logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        columns = torch.repeat_interleave(self.weights(), self.ranks)
        return ((x @ self.lora_A.T) * columns) @ self.lora_B.T

    def folded(self) -> LoraFactors:
        """The weighted update as plain factors, scale 1: exactly what forward adds."""
        columns = torch.repeat_interleave(self.weights().detach(), self.ranks)
        return LoraFactors(self.lora_A.detach().cpu(), (self.lora_B.detach() * columns).cpu(), 1.0)


class ConcatenatedExperts(torch.nn.Module):
    """A CatLayer for every module any expert adapts; only the experts holding a module weigh in it."""

    def __init__(self, experts: dict[str, adapters.Adapter], weighting: str = "softmax", init: str = "equal",
                 seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.module_names = sorted(set().union(*(a.factors for a in experts.values())))
        self.tasks_of: dict[str, list[str]] = {}
        layers = []
        for module in self.module_names:
            present = [task for task, a in experts.items() if module in a.factors]
            self.tasks_of[module] = present
            logits = initial_logits(len(present), weighting, init, generator)
            layers.append(CatLayer([experts[t].factors[module] for t in present], weighting, logits))
        self.layers = torch.nn.ModuleList(layers)

    def weights(self) -> dict[str, dict[str, float]]:
        """Per module, each expert's α."""
        return {module: dict(zip(self.tasks_of[module], layer.weights().tolist()))
                for module, layer in zip(self.module_names, self.layers)}

    def folded(self) -> dict[str, LoraFactors]:
        return {module: layer.folded() for module, layer in zip(self.module_names, self.layers)}

    @contextlib.contextmanager
    def attached(self, model: torch.nn.Module):
        """The model with every CatLayer added to its module's output, for the block; the hooks go
        afterwards whatever happens (the base model is shared, and a hook left behind would change
        every later score)."""
        handles = []
        try:
            for module, layer in zip(self.module_names, self.layers):
                handles.append(model.get_submodule(module).register_forward_hook(_adding(layer)))
            yield model
        finally:
            for handle in handles:
                handle.remove()


def initial_logits(n: int, weighting: str, init: str, generator: torch.Generator) -> torch.Tensor:
    if init == "random":
        return torch.randn(n, generator=generator)
    return torch.zeros(n) if weighting == "softmax" else torch.ones(n)


def _adding(layer: CatLayer):
    def hook(module, args, output):
        return output + layer(args[0]).to(output.dtype)

    return hook


@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """No gradient for any base parameter during the block; the flags as they were afterwards."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


def train_weights(cat: ConcatenatedExperts, model, examples: list[Example], settings: TrainSettings, pad_id: int,
                  progress: bool = False) -> list[dict]:
    """Train the α of `cat` (attached to `model`) on the examples; returns the loss curve. The model
    runs in eval mode (no dropout): the only thing that changes is α."""
    device = model_device(model)
    steps = planned_batches(examples, settings)
    optimizer = torch.optim.AdamW(cat.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / len(steps))
    # One process, fp32, no loss scaling: the experts' optimizer step on α alone.
    trainer = Trainer(model, optimizer, schedule, torch.amp.GradScaler(device.type, enabled=False), pad_id, device,
                      torch.float32, World())
    curve = []
    model.eval()
    with frozen(model), cat.attached(model):
        for epoch, step in tqdm(steps, desc="lora_soups", disable=not progress):
            loss = trainer.step(step)
            curve.append({"step": len(curve) + 1, "epoch": epoch, "loss": loss})
    return curve


@dataclass
class Fitted:
    experts: dict[str, adapters.Adapter]
    cat: ConcatenatedExperts
    curve: list[dict]
    info: dict


class LoraSoups(Composition):
    uses_target_loss = True
    name = "lora_soups"
    paper = ("Prabhakar et al. 2024, 'LoRA Soups: Merging LoRAs for Practical Skill Composition Tasks' "
             "(CAT), arXiv 2410.13025")
    DEFAULTS = {"n_validation": 100, "epochs": 2, "learning_rate": 0.05, "batch_size": 8, "seed": None,
                "max_length": None, "weighting": "softmax", "init": "equal"}

    def __init__(self, **params):
        self.params = check_params(self.name, params, self.DEFAULTS)
        _check_values(self.name, self.params)

    def needs(self) -> Needs:
        return Needs(validation_per_task=self.params["n_validation"], gradients=True, base_forward=True)

    def build(self, inputs: BuildInputs, out_dir: Path) -> dict:
        return self.write(self.fit(inputs), out_dir)

    def fit(self, inputs: BuildInputs) -> Fitted:
        """The experts concatenated and their weights trained on the shared base, which is
        returned as it was lent."""
        if not inputs.experts:
            raise ValueError(f"composition {self.name!r} needs at least one expert adapter, got none")
        if inputs.borrow_base is None:
            raise ValueError(f"composition {self.name!r} trains through the base model: BuildInputs.borrow_base is unset")
        experts = {task: adapters.read_adapter(path) for task, path in inputs.experts.items()}
        adapters.check_same_base(list(experts.values()))
        settings = self.train_settings(inputs.seed)
        seed = settings.seed
        started = time.time()
        with inputs.borrow_base() as loaded:
            for path in inputs.experts.values():
                adapters.check_adapter_base(path, loaded)
            examples, used = self.examples(inputs, loaded.tokenizer)
            cat = ConcatenatedExperts(experts, self.params["weighting"], self.params["init"], seed)
            cat.to(model_device(loaded.model))
            curve = train_weights(cat, loaded.model, examples, settings, loaded.tokenizer.pad_token_id,
                                  inputs.progress)
        info = {"n_examples": used, "steps": len(curve), "seed": seed,
                "train_time_s": round(time.time() - started, 2), "loss": epoch_losses(curve)}
        return Fitted(experts, cat, curve, info)

    def write(self, fitted: Fitted, out_dir: Path) -> dict:
        """The trained combination as one PEFT adapter (α folded into B), its weights and loss curve."""
        weights, folded = fitted.cat.weights(), fitted.cat.folded()
        info = {**fitted.info, "mean_weight": mean_weights(weights), "rank": max(f.rank for f in folded.values())}
        first = next(iter(fitted.experts.values()))
        metadata = {"kind": "merge", "method": self.name, "base_model": first.fingerprint,
                    "sources": [{"path": str(a.path), "task": task, "base_model": a.fingerprint}
                                for task, a in fitted.experts.items()], "info": info}
        template = {k: v for k, v in first.config.items() if k != "auto_mapping"}
        adapters.write_factors(out_dir / ADAPTER_DIR, folded, template, metadata)
        io.write_json(out_dir / WEIGHTS_FILE, weights)
        io.write_json(out_dir / LOSS_CURVE_FILE, fitted.curve)
        return {"info": info}

    def train_settings(self, run_seed: int) -> TrainSettings:
        """The weights' training: random batches that mix the tasks' rows, seeded by the run
        unless the params fix a seed."""
        seed = run_seed if self.params["seed"] is None else self.params["seed"]
        return TrainSettings(seed=seed, epochs=self.params["epochs"], batch_size=self.params["batch_size"],
                             learning_rate=self.params["learning_rate"], group_by_length=False)

    def loss_batches(self, inputs: BuildInputs, tokenizer) -> list[list[Example]]:
        return micro_batches(self.examples(inputs, tokenizer)[0], self.train_settings(inputs.seed))

    def examples(self, inputs: BuildInputs, tokenizer) -> tuple[list[Example], dict[str, int]]:
        """Every task's validation rows encoded as its expert was trained (prompt masked, target
        cut at the same max_length), in task order; plan_steps mixes and shuffles them."""
        examples, used = [], {}
        for task_name in inputs.experts:
            rows = inputs.validation.get(task_name, [])[: self.params["n_validation"]]
            if not rows:
                raise ValueError(f"composition {self.name!r} needs validation rows of every task; "
                                 f"none for {task_name!r} (given: {sorted(inputs.validation)})")
            task, max_length = get_task(task_name), self.max_length(inputs, task_name)
            kept = [e for e in encode_rows(tokenizer, task, rows, max_length) if e is not None]
            if not kept:
                raise ValueError(f"composition {self.name!r}: no {task_name} validation row keeps a target "
                                 f"token within max_length={max_length}")
            examples += kept
            used[task_name] = len(kept)
        return examples, used

    def max_length(self, inputs: BuildInputs, task: str) -> int:
        if self.params["max_length"] is not None:
            return self.params["max_length"]
        settings = inputs.train_settings.get(task)
        return settings.max_length if settings is not None else FALLBACK_MAX_LENGTH

    def load(self, out_dir: Path) -> Composed:
        return OneModel(out_dir / ADAPTER_DIR)


def epoch_losses(curve: list[dict]) -> dict[str, float]:
    """Mean training loss of the first and the last epoch: what training the weights achieved."""
    by_epoch: dict[int, list[float]] = {}
    for point in curve:
        by_epoch.setdefault(point["epoch"], []).append(point["loss"])
    first, last = by_epoch[min(by_epoch)], by_epoch[max(by_epoch)]
    return {"first_epoch": round(sum(first) / len(first), 5), "last_epoch": round(sum(last) / len(last), 5)}


def mean_weights(weights: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each expert's α averaged over the modules it adapts."""
    per_task: dict[str, list[float]] = {}
    for by_task in weights.values():
        for task, alpha in by_task.items():
            per_task.setdefault(task, []).append(alpha)
    return {task: round(sum(values) / len(values), 5) for task, values in per_task.items()}


def _check_values(name: str, params: dict) -> None:
    """One clear error for the first bad parameter, naming it and what it accepts."""
    for key, low in (("n_validation", 1), ("epochs", 1), ("batch_size", 1)):
        _check_int(name, key, params[key], low)
    for key, low, high in (("seed", 0, MAX_SEED), ("max_length", 8, None)):
        if params[key] is not None:
            _check_int(name, key, params[key], low, "or null", high)
    rate = params["learning_rate"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"composition {name!r}: learning_rate must be a finite number > 0, got {rate!r}")
    for key, valid in (("weighting", WEIGHTINGS), ("init", INITS)):
        if params[key] not in valid:
            raise ValueError(f"composition {name!r}: unknown {key} {params[key]!r}; valid: {', '.join(valid)}")
    if params["init"] == "random" and params["weighting"] != "softmax":
        raise ValueError(f"composition {name!r}: init 'random' draws softmax logits (as the reference code "
                         f"does) and needs weighting 'softmax', got {params['weighting']!r}")


def _check_int(name: str, key: str, value, low: int, also: str = "", high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"from {low} to {high}"
        raise ValueError(f"composition {name!r}: {key} must be an integer {allowed}{' ' + also if also else ''}, "
                         f"got {value!r}")
