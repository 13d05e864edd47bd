"""LoraHub: Huang, Liu, Lin, Pang, Du, Lin 2023, "LoraHub: Efficient Cross-Task Generalization via
Dynamic LoRA Composition", arXiv:2307.13269 (reference code: github.com/sail-sg/lorahub).

One weight per expert, found without gradients: nevergrad's NGOpt minimises the validation loss
of the experts combined at those weights, plus 0.05·mean|wᵢ|, starting from w = 0 within
[-1.5, 1.5] with a budget of 40 loss evaluations. Two ways to combine the experts:

- "faithful", as the reference code does: it scales every tensor of each adapter's state dict
  by wᵢ and sums them, so A = Σ wᵢAᵢ and B = Σ wᵢBᵢ, and the update s·B·A carries each expert's
  own term at wᵢ² (a negative weight still adds its expert) plus cross terms wᵢwⱼ·s·BᵢAⱼ that no
  expert learned. It needs equal ranks and scalings.
- "exact": Σ wᵢ·sᵢ·BᵢAᵢ, the weighted sum of the updates, stored without loss as concatenated
  rank-Σrᵢ factors (task arithmetic's construction).
So faithful(w) = exact(w∘w) + the cross terms (test_lorahub states this law).

Where this differs from the reference code:
- The loss is the mean target-token cross-entropy of each task's validation examples, averaged
  over tasks. The reference pools all examples' tokens in one batch and then divides that mean by
  the number of examples (so its loss shrinks with the sample size while the 0.05·mean|w| term
  does not); pooled tokens would also leave AG News' one-token targets about 1% of a loss made of
  GSM8K's hundred-token solutions. Targets are encoded as training encodes them (EOS after a
  generated target, as T5's labels in the reference end with </s>); nothing is truncated.
- The regulariser is the reference's own: 0.05 · Σ|wᵢ| / n (its code calls it sum_of_squares).
- The reference returns nevergrad's recommendation; we take the candidate with the lowest loss
  among those evaluated, so the reported loss is one that was measured (for this deterministic
  loss NGOpt's recommendation is that candidate; the trajectory records both).
- The reference loads only seq2seq models (sail-sg/lorahub #25); this runs on the causal LM base.
- The seed fixes nevergrad's random state explicitly (the reference seeds numpy globally).

Candidates are scored in memory on the borrowed base (LoraHub.search_on), without a folder each.

`grid` (off by default) also measures this loss at every point of a weight grid, e.g. the
task-arithmetic sweep's {0, 0.5, 1, 1.5}², after the search: the search can then be judged on
its own objective (`grid_rank`: the share of grid points whose loss is at least as low as the
result's), beside the sweep's judgement on its validation criterion (the run's placed.json).
"""

from __future__ import annotations

import itertools
import math
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from .. import adapters, io, stats
from ..config import MAX_SEED
from ..evaluation import model_device
from ..merging.average import merge_average
from ..merging.factors import LoraFactors
from ..merging.ops import concat_factors
from ..tasks import get_task
from ..training import IGNORE_INDEX, Example, batch_loss_sum, collate, encode_rows
from .base import BuildInputs, Composed, Composition, Needs, OneModel, check_params
from .static_merge import ADAPTER_DIR

TRAJECTORY_FILE = "search.json"
L1_STRENGTH = 0.05  # the reference's default_l1_regularization
VARIANTS = ("faithful", "exact")
LOSS_BATCH_SIZE = 8


class LoraHubError(ValueError):
    """Experts or validation data that LoraHub cannot use."""


# ---------------------------------------------------------------- pure tensor parts

def combine_faithful(factors: list[LoraFactors], weights: list[float], module: str = "") -> LoraFactors:
    """The reference code's combination: A = Σ wᵢAᵢ, B = Σ wᵢBᵢ, the experts' common scale kept."""
    ranks, scales = [f.rank for f in factors], [f.scale for f in factors]
    if len(set(ranks)) > 1 or len(set(scales)) > 1:
        raise LoraHubError(f"lorahub variant 'faithful' sums the experts' A and B factors, so they need equal "
                           f"ranks and scalings; module {module or '?'} has ranks {ranks} and scalings {scales}: "
                           f"use variant='exact'")
    return merge_average(factors, weights, {"normalize": False}, module)[0]


def combine_exact(factors: list[LoraFactors], weights: list[float], module: str = "") -> LoraFactors:
    """Σ wᵢ·sᵢ·BᵢAᵢ exactly, as concatenated factors of rank Σ rᵢ and scale 1."""
    return concat_factors(factors, weights)


COMBINERS: dict[str, Callable[[list[LoraFactors], list[float], str], LoraFactors]] = {
    "faithful": combine_faithful, "exact": combine_exact}


def combine_modules(variant: str, modules: dict[str, list[LoraFactors]], weights) -> dict[str, LoraFactors]:
    """Every module's experts combined at `weights` (one per expert, in the experts' order)."""
    weights = [float(w) for w in weights]
    return {name: COMBINERS[variant](factors, weights, name) for name, factors in modules.items()}


def l1_penalty(weights) -> float:
    return L1_STRENGTH * sum(abs(float(w)) for w in weights) / len(weights)


def regularised(cross_entropy: float, weights) -> float:
    """The searched loss; infinite for a diverged (NaN) cross-entropy, which would compare false
    with everything and could end up "best"."""
    return cross_entropy + l1_penalty(weights) if math.isfinite(cross_entropy) else math.inf


# ---------------------------------------------------------------- the search

@dataclass
class Search:
    candidates: list[dict]  # in evaluation order: weights, cross_entropy, loss (with the L1 term)
    best: dict  # the candidate with the lowest loss
    recommendation: list[float]  # what nevergrad recommends at the end
    optimizer: str  # the optimizer NGOpt chose for this dimension and budget


def search_weights(cross_entropy: Callable[[list[float]], float], n_experts: int, budget: int,
                   bounds: tuple[float, float], seed: int) -> Search:
    """Minimise cross_entropy(w) + 0.05·mean|w| over w in bounds, from w = 0, with NGOpt.

    `cross_entropy` is any function of the weight list, so the search can be tested on a loss with
    a known minimum; build() passes the validation loss of the combined experts."""
    import nevergrad as ng
    import numpy as np

    parametrization = ng.p.Array(init=[0.0] * n_experts, lower=bounds[0], upper=bounds[1])
    parametrization.random_state = np.random.RandomState(seed)
    optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=budget)
    candidates = []

    def objective(array) -> float:
        weights = [float(w) for w in array]
        value = float(cross_entropy(weights))
        candidates.append({"index": len(candidates), "weights": weights, "cross_entropy": value,
                           "loss": regularised(value, weights)})
        return candidates[-1]["loss"]

    with warnings.catch_warnings():
        # NGOpt's COBYLA asks scipy for a final trust radius of 0, which scipy replaces by 1e-6 with
        # a warning per run; the search is unaffected.
        warnings.filterwarnings("ignore", message="COBYLA: Invalid RHOEND")
        recommendation = optimizer.minimize(objective, verbosity=0)
    return Search(candidates, min(candidates, key=lambda c: c["loss"]),
                  [float(w) for w in recommendation.value], optimizer.optim.name)


# ---------------------------------------------------------------- the loss on the base model

def validation_batches(tokenizer, rows: dict[str, list[dict]]) -> dict[str, list[list[Example]]]:
    """Each task's rows encoded whole (no max_length), in batches of LOSS_BATCH_SIZE."""
    batches = {}
    for name, task_rows in rows.items():
        examples = [e for e in encode_rows(tokenizer, get_task(name), task_rows, sys.maxsize) if e is not None]
        if not examples:
            raise LoraHubError(f"lorahub: no validation row of {name} has a target token to score")
        batches[name] = [examples[start: start + LOSS_BATCH_SIZE] for start in range(0, len(examples), LOSS_BATCH_SIZE)]
    return batches


class ValidationLoss:
    """Mean target-token cross-entropy of each task's rows, averaged over tasks, on a given model.

    The rows are tokenised and batched once; each call is forward passes only."""

    def __init__(self, tokenizer, rows: dict[str, list[dict]], device):
        self.device, self.batches, self.token_counts = device, {}, {}
        for name, batches in validation_batches(tokenizer, rows).items():
            self.token_counts[name] = sum(len(e.labels) - e.labels.count(IGNORE_INDEX) for b in batches for e in b)
            self.batches[name] = [collate(batch, tokenizer.pad_token_id, device) for batch in batches]

    @torch.inference_mode()
    def __call__(self, model) -> float:
        per_task = [sum(float(batch_loss_sum(model, batch, self.device)) for batch in batches) / self.token_counts[name]
                    for name, batches in self.batches.items()]
        return sum(per_task) / len(per_task)


def expert_modules(experts: list[adapters.Adapter]) -> dict[str, list[LoraFactors]]:
    """Module name -> the experts' factors in order; every expert must adapt the same modules."""
    names = set(experts[0].factors)
    for expert in experts[1:]:
        if set(expert.factors) != names:
            differing = sorted(names.symmetric_difference(expert.factors))
            raise LoraHubError(f"lorahub combines experts module by module: {experts[0].path} and {expert.path} "
                               f"adapt different modules ({', '.join(differing[:5])}"
                               f"{', ...' if len(differing) > 5 else ''})")
    return {name: [expert.factors[name] for expert in experts] for name in sorted(names)}


def load_factors(peft_model, factors: dict[str, LoraFactors]) -> None:
    """Overwrite the factors of a loaded PEFT adapter (saved by adapters.write_factors: scale 1)."""
    with torch.no_grad():
        for module, f in factors.items():
            layer, folded = peft_model.base_model.model.get_submodule(module), f.folded()
            layer.lora_A["default"].weight.copy_(folded.lora_A)
            layer.lora_B["default"].weight.copy_(folded.lora_B)


# ---------------------------------------------------------------- the composition

class LoraHub(Composition):
    uses_target_loss = True
    name = "lorahub"
    libraries = ("nevergrad",)
    paper = "Huang et al. 2023, 'LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition', " \
            "arXiv:2307.13269"
    DEFAULTS = {"variant": "faithful", "seed": 0, "budget": 40, "n_validation": 5, "bounds": [-1.5, 1.5],
                "grid": None}

    def __init__(self, **params):
        self.params = check_params(self.name, params, self.DEFAULTS)
        problem = parameter_problem(self.params)
        if problem:
            raise ValueError(f"composition 'lorahub': {problem}")
        self.params["bounds"] = [float(b) for b in self.params["bounds"]]

    def needs(self) -> Needs:
        return Needs(validation_per_task=self.params["n_validation"], base_forward=True)

    def build(self, inputs: BuildInputs, out_dir: Path) -> dict:
        started = time.time()
        experts = [adapters.read_adapter(path) for path in inputs.experts.values()]
        adapters.check_same_base(experts)
        combine = partial(combine_modules, self.params["variant"], expert_modules(experts))
        combine([0.0] * len(experts))  # a variant the experts cannot take fails here, before the base is borrowed
        rows = self.validation_rows(inputs)
        if inputs.borrow_base is None:
            raise LoraHubError("lorahub runs the base model: BuildInputs.borrow_base is None")
        template = {k: v for k, v in experts[0].config.items() if k != "auto_mapping"}
        metadata = {"kind": "lorahub", "variant": self.params["variant"], "base_model": experts[0].fingerprint,
                    "sources": [{"task": task, "path": str(path)} for task, path in inputs.experts.items()]}
        with inputs.borrow_base() as loaded:
            search, grid = self.search_on(loaded, combine, rows, template, metadata, out_dir)
        best_weights = dict(zip(inputs.experts, search.best["weights"]))
        adapters.write_factors(out_dir / ADAPTER_DIR, combine(search.best["weights"]), template,
                               {**metadata, "weights": best_weights})
        summary = {"best_weights": best_weights, "best_loss": search.best["loss"],
                   "best_cross_entropy": search.best["cross_entropy"], "evaluations": len(search.candidates),
                   "optimizer": search.optimizer, "seconds": round(time.time() - started, 2)}
        if grid is not None:
            losses = [point["loss"] for point in grid]
            summary["grid_rank"] = stats.grid_share(search.best["loss"], losses, higher_is_better=False)
        io.write_json(out_dir / TRAJECTORY_FILE, {
            "params": self.params, "tasks": list(inputs.experts), "l1_strength": L1_STRENGTH,
            "n_validation": {task: len(task_rows) for task, task_rows in rows.items()}, **summary,
            "best": search.best, "recommendation": search.recommendation, "candidates": search.candidates,
            **({"grid": grid} if grid is not None else {})})
        return summary

    def search_on(self, loaded, combine, rows: dict[str, list[dict]], template: dict, metadata: dict,
                  out_dir: Path) -> tuple[Search, list[dict] | None]:
        """The search on the borrowed base, then the loss at the grid's points if one is asked for:
        one adapter folder of the combined shapes is loaded once into PEFT layers, and each
        candidate only overwrites their factors."""
        n_experts = len(metadata["sources"])
        with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
            adapters.write_factors(Path(scratch) / "candidate", combine([0.0] * n_experts), template, metadata)
            model = adapters.apply_adapter(loaded, Path(scratch) / "candidate").eval()
        try:
            loss = ValidationLoss(loaded.tokenizer, rows, model_device(model))

            measured: dict[tuple, float] = {}

            def cross_entropy(weights: list[float]) -> float:
                # The loss is deterministic, so a grid point the search already tried (its start
                # at 0 always is one) is not run again.
                if tuple(weights) not in measured:
                    load_factors(model, combine(weights))
                    measured[tuple(weights)] = loss(model)
                return measured[tuple(weights)]

            search = search_weights(cross_entropy, n_experts, self.params["budget"], tuple(self.params["bounds"]),
                                    self.params["seed"])
            grid = None if self.params["grid"] is None else score_grid(cross_entropy, self.params["grid"], n_experts)
            return search, grid
        finally:
            # The borrow restores the weights; unload() also drops the peft_config PEFT leaves on the
            # base, which would make the next adapter loaded on it warn of "multiple adapters".
            model.unload()

    def load(self, out_dir: Path) -> Composed:
        return OneModel(out_dir / ADAPTER_DIR)

    def loss_batches(self, inputs: BuildInputs, tokenizer) -> list[list[Example]]:
        return [batch for batches in validation_batches(tokenizer, self.validation_rows(inputs)).values()
                for batch in batches]

    def validation_rows(self, inputs: BuildInputs) -> dict[str, list[dict]]:
        missing = [task for task in inputs.experts if not inputs.validation.get(task)]
        if missing:
            raise LoraHubError(f"lorahub needs {self.params['n_validation']} validation rows per task; none for "
                               f"{', '.join(missing)} (given for: {', '.join(sorted(inputs.validation)) or 'no task'})")
        return {task: inputs.validation[task][: self.params["n_validation"]] for task in inputs.experts}


def score_grid(cross_entropy: Callable[[list[float]], float], values: list[float], n_experts: int) -> list[dict]:
    """LoraHub's loss at every point of the grid whose axes each take `values`, in grid order."""
    points = []
    for weights in itertools.product([float(v) for v in values], repeat=n_experts):
        value = float(cross_entropy(list(weights)))
        points.append({"weights": list(weights), "cross_entropy": value, "loss": regularised(value, weights)})
    return points


def parameter_problem(params: dict) -> str | None:
    """What is wrong with LoraHub's parameters (after defaults are filled in), or None."""
    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if params["variant"] not in VARIANTS:
        return f"unknown variant {params['variant']!r}; valid: {', '.join(VARIANTS)}"
    for name in ("budget", "n_validation"):
        if not is_int(params[name]) or params[name] < 1:
            return f"{name} must be an integer >= 1, got {params[name]!r}"
    if not is_int(params["seed"]) or not 0 <= params["seed"] <= MAX_SEED:
        return f"seed must be an integer from 0 to {MAX_SEED}, got {params['seed']!r}"
    bounds = params["bounds"]
    if (not isinstance(bounds, (list, tuple)) or len(bounds) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in bounds)
            or not bounds[0] <= 0 <= bounds[1] or bounds[0] == bounds[1]):
        return f"bounds must be [low, high] with finite low <= 0 <= high and low < high (the search starts at 0), " \
               f"got {bounds!r}"
    grid = params["grid"]
    if grid is not None and (
            not isinstance(grid, (list, tuple)) or not grid
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in grid)
            or len(set(grid)) != len(grid)):
        return f"grid must be null or a list of distinct finite numbers (each expert's weight values), got {grid!r}"
    return None
