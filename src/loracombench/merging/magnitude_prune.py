"""Magnitude pruning of the merged update, after Han, Pool, Tran, Dally 2015, "Learning both
Weights and Connections for Efficient Neural Networks", arXiv 1506.02626.

The weighted sum Σ wᵢΔWᵢ is computed densely, only its top `density` fraction of entries by
magnitude is kept, and the result is stored exactly (rank=0, see dense.py) or, for a positive
`rank`, as its best rank-k approximation with the relative error in info. PEFT's "magnitude_prune" instead prunes each task's
update before summing; pruning the merged update keeps the entries that matter after
cancellation between tasks.
"""

from __future__ import annotations

from loracombench.merging import params as shared
from loracombench.merging.dense import refactorise, weighted_updates
from loracombench.merging.factors import LoraFactors
from loracombench.merging.ops import trim_by_magnitude
from loracombench.merging.registry import MergeMethod, register


def merge_magnitude_prune(factors: list[LoraFactors], weights: list[float], params: dict, module: str):
    merged = trim_by_magnitude(weighted_updates(factors, weights).sum(dim=0), params["density"])
    return refactorise(merged, params["rank"])


register(MergeMethod(
    name="magnitude_prune",
    fn=merge_magnitude_prune,
    params=(
        shared.density(0.2, "fraction of the merged update's entries kept by magnitude"),
        shared.rank("output rank; 0 = exact (full-rank factors), k > 0 = best rank-k approximation"),
    ),
    reference="Han, Pool, Tran, Dally 2015, 'Learning both Weights and Connections for Efficient Neural "
              "Networks', arXiv 1506.02626 (magnitude pruning applied to the merged update)",
    summary="Σ wᵢΔWᵢ pruned to its largest entries; exact by default, rank=k compresses",
    averages=False,
    needs_equal_ranks=False,
    takes_union_of_modules=True,
))
