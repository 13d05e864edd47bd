"""Shared steps of the methods that merge dense updates ΔW and then re-factorise the result."""

from __future__ import annotations

import torch

from loracombench.merging.factors import LoraFactors
from loracombench.merging.ops import relative_residual, truncated_svd_factors


def weighted_updates(factors: list[LoraFactors], weights: list[float]) -> torch.Tensor:
    """The stacked dense updates wᵢ·ΔWᵢ, shape (n, out, in)."""
    return torch.stack([(w * f.scale * f.lora_B) @ f.lora_A for f, w in zip(factors, weights)])


def output_rank(requested: int, factors: list[LoraFactors]) -> int:
    """`requested`, or when 0 the sum of the input ranks (enough to store a plain sum exactly)."""
    return requested or sum(f.rank for f in factors)


def refactorise(delta: torch.Tensor, rank: int) -> tuple[LoraFactors, dict]:
    """Rank-`rank` factors of a dense update, and the relative Frobenius error they leave."""
    lora_A, lora_B = truncated_svd_factors(delta, rank)
    error = relative_residual(delta, lora_B @ lora_A)
    return LoraFactors(lora_A, lora_B, 1.0), {"rank": lora_A.shape[0], "relative_error": error}
