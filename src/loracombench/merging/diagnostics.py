"""How much two or more adapters interfere, module by module and over the whole model.

For each pair of adapters (i, j), keyed "i-j" in adapter order:
- cosine: cosine similarity of the flattened updates ΔWᵢ, ΔWⱼ (NaN when one is zero);
- sign_conflict: the fraction of all entries where both updates are nonzero and of opposite
  sign (1.0 for an adapter and its negation, 0.0 for an adapter and itself);
- norm_ratio: ‖ΔWᵢ‖_F / ‖ΔWⱼ‖_F.
And for all adapters together:
- cross_term_ratio: factor averaging computes mean(B)·mean(A) = (1/n²)(Σᵢ BᵢAᵢ + Σ_{i≠j} BᵢAⱼ);
  this is ‖Σ_{i≠j} BᵢAⱼ‖_F / ‖Σᵢ BᵢAᵢ‖_F, with each scale folded into its B (Bᵢ ← sᵢBᵢ) as the
  average method does. It is None for a module whose adapters' ranks differ (no cross terms).
"overall" gives the same quantities for all modules' updates flattened and concatenated, so large
modules weigh more; its cross_term_ratio pools only the modules that have cross terms (equal
ranks), and is None when none has. Modules that some adapter lacks are listed in "skipped_modules".
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import reduce
from operator import add
from itertools import combinations

import torch

from loracombench.io import atomic_file
from loracombench.merging.factors import LoraFactors
from loracombench.merging.merge import adapter_count, check_same_shapes, checked_factor
from loracombench.merging.registry import MergeError


@dataclass
class _Tally:
    """Additive sums from which every statistic follows, so that modules can be pooled exactly."""

    gram: torch.Tensor
    conflicts: torch.Tensor
    entries: int
    cross_squared: float = 0.0  # stays 0 where ranks differ, so pooling skips those modules
    own_squared: float = 0.0
    has_cross_terms: bool = True

    def __add__(self, other: "_Tally") -> "_Tally":
        return _Tally(self.gram + other.gram, self.conflicts + other.conflicts, self.entries + other.entries,
                      self.cross_squared + other.cross_squared, self.own_squared + other.own_squared,
                      self.has_cross_terms or other.has_cross_terms)


def diagnose(modules: dict[str, list[LoraFactors]]) -> dict:
    count = adapter_count(modules)
    if count < 2:
        raise MergeError(f"diagnostics compare adapters: need at least 2, got {count}")
    tallies, skipped = {}, []
    for name, factors in modules.items():
        if any(f is None for f in factors):
            skipped.append(name)
            continue
        tallies[name] = module_tally(name, factors)
    if not tallies:
        raise MergeError("no module is present in every adapter")
    pooled = reduce(add, tallies.values())
    return {
        "adapters": count,
        "pairs": [_pair_key(i, j) for i, j in combinations(range(count), 2)],
        "modules": {name: summarise(tally) for name, tally in tallies.items()},
        "overall": summarise(pooled),
        "skipped_modules": skipped,
    }


def module_tally(name: str, factors: list[LoraFactors]) -> _Tally:
    checked = [checked_factor(name, i, f) for i, f in enumerate(factors)]
    check_same_shapes(name, list(enumerate(checked)))
    updates = torch.stack([f.delta_weight().reshape(-1) for f in checked])
    signs = updates.sign()
    conflicts = ((signs[:, None, :] * signs[None, :, :]) < 0).sum(dim=-1)
    tally = _Tally(updates @ updates.T, conflicts, updates.shape[1])
    if len({f.rank for f in checked}) > 1:
        tally.has_cross_terms = False
        return tally
    tally.cross_squared, tally.own_squared = cross_and_own_squared(checked)
    return tally


def cross_and_own_squared(factors: list[LoraFactors]) -> tuple[float, float]:
    """‖Σ_{i≠j} sᵢBᵢAⱼ‖², ‖Σᵢ sᵢBᵢAᵢ‖² for equal-rank factors."""
    folded = [f.folded() for f in factors]
    own = sum(f.lora_B @ f.lora_A for f in folded)
    everything = sum(f.lora_B for f in folded) @ sum(f.lora_A for f in folded)
    return float(torch.linalg.norm(everything - own)) ** 2, float(torch.linalg.norm(own)) ** 2


def summarise(tally: _Tally) -> dict:
    count = tally.gram.shape[0]
    norms = tally.gram.diagonal().sqrt()
    pairs = list(combinations(range(count), 2))
    return {
        "cosine": {_pair_key(i, j): _ratio(float(tally.gram[i, j]), float(norms[i] * norms[j])) for i, j in pairs},
        "sign_conflict": {_pair_key(i, j): int(tally.conflicts[i, j]) / tally.entries for i, j in pairs},
        "norm_ratio": {_pair_key(i, j): _ratio(float(norms[i]), float(norms[j])) for i, j in pairs},
        "cross_term_ratio": (_ratio(math.sqrt(tally.cross_squared), math.sqrt(tally.own_squared))
                             if tally.has_cross_terms else None),
    }


def plot_diagnostics(result: dict, path: str | os.PathLike) -> None:
    """A PNG of the per-module cosine, sign-conflict rate and cross-term ratio, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(result["modules"])
    figure = Figure(figsize=(max(8.0, 0.18 * len(names)), 9.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(3, 1, sharex=True)
    for key, axis, label in (("cosine", axes[0], "cosine of ΔW"), ("sign_conflict", axes[1], "sign-conflict rate")):
        for pair in result["pairs"]:
            axis.plot(range(len(names)), [result["modules"][n][key][pair] for n in names], marker=".",
                      label=f"adapters {pair} (overall {result['overall'][key][pair]:.3f})")
        axis.set_ylabel(label)
        axis.legend(fontsize="small")
    ratios = [result["modules"][n]["cross_term_ratio"] for n in names]
    axes[2].bar(range(len(names)), [math.nan if r is None else r for r in ratios])
    axes[2].set_ylabel("‖cross terms‖ / ‖own terms‖")
    axes[2].set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    axes[2].set_xlabel("module")
    figure.suptitle(f"Adapter interference per module ({result['adapters']} adapters; overall cross-term "
                    f"ratio {_format(result['overall']['cross_term_ratio'])})")
    with atomic_file(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)


def _pair_key(i: int, j: int) -> str:
    return f"{i}-{j}"


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
