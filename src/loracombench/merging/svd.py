"""SVD merge: Σ wᵢΔWᵢ re-factorised at a chosen rank by truncated SVD.

The truncation is optimal in Frobenius norm (Eckart & Young 1936, "The approximation of one matrix
by another of lower rank", Psychometrika 1(3)); PEFT's add_weighted_adapter "svd" does the same.
The sum is decomposed from its concatenated factors (one QR and a small SVD), never densely, so
the dropped singular values, and thus the relative error recorded in info, are exact.
rank=0 means the largest input rank.
"""

from __future__ import annotations

import torch

from loracombench.merging import params as shared
from loracombench.merging.factors import LoraFactors
from loracombench.merging.ops import concat_factors, svd_of_product
from loracombench.merging.registry import MergeMethod, register


def merge_svd(factors: list[LoraFactors], weights: list[float], params: dict, module: str):
    summed = concat_factors(factors, weights)
    u, s, vh = svd_of_product(summed.lora_B, summed.lora_A)
    rank = min(params["rank"] or max(f.rank for f in factors), s.numel())
    total = float(torch.linalg.norm(s))
    error = float(torch.linalg.norm(s[rank:])) / total if total > 0 else 0.0
    merged = LoraFactors(vh[:rank], u[:, :rank] * s[:rank], 1.0)
    return merged, {"rank": rank, "relative_error": error}


register(MergeMethod(
    name="svd",
    fn=merge_svd,
    params=(shared.rank("output rank; 0 = the largest input rank"),),
    reference="Eckart & Young 1936, 'The approximation of one matrix by another of lower rank', "
              "Psychometrika 1(3) (no arXiv id); as in PEFT add_weighted_adapter(combination_type='svd')",
    summary="Σ wᵢΔWᵢ truncated to a rank by SVD",
    averages=False,
    needs_equal_ranks=False,
    takes_union_of_modules=True,
))
