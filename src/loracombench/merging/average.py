"""Factor averaging: the original LoRAComBench merge, a weighted mean of the A and B matrices.

No paper proposes it; it is the naive baseline (PEFT's add_weighted_adapter "linear" is a
variant). It averages factors, not updates, so it is not the mean of the ΔWᵢ:
mean(B)·mean(A) = (1/n²)(Σᵢ BᵢAᵢ + Σ_{i≠j} BᵢAⱼ), and the cross terms BᵢAⱼ are interference
that no adapter learned (diagnostics.diagnose reports their size as cross_term_ratio).

Weights: Ā = Σ wᵢAᵢ / Σ wᵢ and B̄ = Σ wᵢBᵢ / Σ wᵢ (normalize=true), or the plain weighted sums
Σ wᵢAᵢ, Σ wᵢBᵢ (normalize=false), so the product carries each weight twice.
Scaling: when every adapter has the same scale s, the result keeps s, giving s·B̄·Ā. When the
scales differ, each adapter's scale is first folded into its B (Bᵢ ← sᵢBᵢ) and the result has
scale 1, so an adapter trained with a larger lora_alpha/r counts for more, as it does in its ΔW.
"""

from __future__ import annotations

from loracombench.merging.factors import LoraFactors
from loracombench.merging.registry import MergeError, MergeMethod, Param, register


def normalising_total(weights: list[float], params: dict) -> float:
    """What the weighted factor sums are divided by: Σ wᵢ with normalize=true, else 1."""
    total = sum(weights) if params["normalize"] else 1.0
    if total == 0:
        raise MergeError("average: the weights sum to 0, so they cannot be normalised; "
                         "use normalize=false or other weights")
    return total


def merge_average(factors: list[LoraFactors], weights: list[float], params: dict, module: str):
    total = normalising_total(weights, params)
    shared_scale = all(f.scale == factors[0].scale for f in factors)
    parts = factors if shared_scale else [f.folded() for f in factors]
    lora_A = sum(w * f.lora_A for f, w in zip(parts, weights)) / total
    lora_B = sum(w * f.lora_B for f, w in zip(parts, weights)) / total
    return LoraFactors(lora_A, lora_B, parts[0].scale), {"rank": lora_A.shape[0]}


register(MergeMethod(
    name="average",
    fn=merge_average,
    params=(Param("normalize", True, bool, "divide the weighted factor sums by the sum of the weights"),),
    reference="No paper: the original LoRAComBench factor averaging; factors as in Hu et al. 2021, "
              "'LoRA: Low-Rank Adaptation of Large Language Models', arXiv 2106.09685",
    summary="weighted mean of the A matrices and of the B matrices (keeps the rank; adds cross terms)",
    averages=True,
    check_weights=normalising_total,
    needs_equal_ranks=True,
    takes_union_of_modules=False,
))
