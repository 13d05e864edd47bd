"""Shared steps of the methods that merge dense updates ΔW: TIES, DARE, magnitude pruning.

Their merged update is generally full rank, so by default it is stored exactly (rank 0 below):
as full-rank factors, B = I and A = ΔW when out ≤ in, else B = ΔW and A = I, rank min(out, in).
That is still a plain PEFT adapter, the evaluator needs no second code path, and no row of the
table silently measures a projection of its method instead of the method. A positive rank asks
for the best rank-k approximation (truncated SVD) instead, and its relative Frobenius error is
recorded so that the report can show it next to the score.
"""

from __future__ import annotations

import torch

from loracombench.merging.factors import LoraFactors
from loracombench.merging.ops import relative_residual, truncated_svd_factors

EXACT = 0  # the `rank` value that means "store the merged update without loss"


def weighted_updates(factors: list[LoraFactors], weights: list[float]) -> torch.Tensor:
    """The stacked dense updates wᵢ·ΔWᵢ, shape (n, out, in)."""
    return torch.stack([(w * f.scale * f.lora_B) @ f.lora_A for f, w in zip(factors, weights)])


def exact_factors(delta: torch.Tensor) -> LoraFactors:
    """Factors whose product is `delta` bit for bit: one of them is an identity matrix."""
    out_features, in_features = delta.shape
    if out_features <= in_features:
        return LoraFactors(delta.clone(), torch.eye(out_features, dtype=delta.dtype), 1.0)
    return LoraFactors(torch.eye(in_features, dtype=delta.dtype), delta.clone(), 1.0)


def refactorise(delta: torch.Tensor, rank: int) -> tuple[LoraFactors, dict]:
    """Factors of a dense update: exact when `rank` is EXACT (0) or at least min(out, in), else
    its best rank-`rank` approximation with the relative Frobenius error it leaves."""
    if rank == EXACT or rank >= min(delta.shape):
        factors = exact_factors(delta)
        return factors, {"rank": factors.rank, "relative_error": 0.0}
    lora_A, lora_B = truncated_svd_factors(delta, rank)
    error = relative_residual(delta, lora_B @ lora_A)
    return LoraFactors(lora_A, lora_B, 1.0), {"rank": lora_A.shape[0], "relative_error": error}
