"""TIES-Merging: Yadav, Tam, Choshen, Raffel, Bansal 2023, "TIES-Merging: Resolving Interference
When Merging Models", arXiv 2306.01708.

Per module, on the dense task updates τᵢ = wᵢΔWᵢ:
1. trim: keep the top `density` fraction of each τᵢ by magnitude (paper: 20%), zero the rest;
2. elect: per entry, the sign of Σᵢ τᵢ (the paper's total mass; sign_mode=count uses the
   majority of signs instead);
3. disjoint merge: per entry, the mean of the τᵢ whose sign equals the elected one;
4. scale the result by λ (`lam`).
The result is generally full rank; it is stored exactly by default (rank=0, see dense.py). A
positive `rank` keeps its best rank-k approximation, and info records the relative error.

The weights scale τᵢ before the sign election. PEFT's ties elects on the unweighted trimmed
updates and applies the weights afterwards; the two agree when all weights are equal and positive.
"""

from __future__ import annotations

import torch

from loracombench.merging import params as shared
from loracombench.merging.dense import refactorise, weighted_updates
from loracombench.merging.factors import LoraFactors
from loracombench.merging.ops import sign_consensus_mean, trim_by_magnitude
from loracombench.merging.registry import MergeMethod, register


def ties_combine(stacked: torch.Tensor, density: float, sign_mode: str) -> torch.Tensor:
    """Trim each task of `stacked`, elect signs, and average the agreeing entries."""
    trimmed = torch.stack([trim_by_magnitude(task, density) for task in stacked])
    return sign_consensus_mean(trimmed, sign_mode)


def merge_ties(factors: list[LoraFactors], weights: list[float], params: dict, module: str):
    tasks = weighted_updates(factors, weights)
    merged = params["lam"] * ties_combine(tasks, params["density"], params["sign_mode"])
    return refactorise(merged, params["rank"])


register(MergeMethod(
    name="ties",
    fn=merge_ties,
    params=(
        shared.density(0.2, "fraction of each task update kept by magnitude"),
        shared.sign_mode(),
        shared.lam(),
        shared.rank("output rank; 0 = exact (full-rank factors), k > 0 = best rank-k approximation"),
    ),
    reference="Yadav, Tam, Choshen, Raffel, Bansal 2023, 'TIES-Merging: Resolving Interference When "
              "Merging Models', arXiv 2306.01708",
    summary="trim each ΔW, elect signs, mean of agreeing entries; exact by default, rank=k compresses",
    averages=True,
    needs_equal_ranks=False,
    takes_union_of_modules=True,
))
