"""Task arithmetic: Ilharco et al. 2023, "Editing Models with Task Arithmetic", arXiv 2212.04089.

The merged update is λ·Σ wᵢΔWᵢ, stored without loss by concatenating the factors:
A = [A₁; …; Aₙ] (rows) and B = [λw₁s₁B₁, …, λwₙsₙBₙ] (columns), scale 1, rank Σ rᵢ.
Ranks may differ; an adapter lacking a module adds nothing to it.
"""

from __future__ import annotations

from loracombench.merging import params as shared
from loracombench.merging.factors import LoraFactors
from loracombench.merging.ops import concat_factors
from loracombench.merging.registry import MergeMethod, register


def merge_task_arithmetic(factors: list[LoraFactors], weights: list[float], params: dict, module: str):
    merged = concat_factors(factors, [params["lam"] * w for w in weights])
    return merged, {"rank": merged.rank}


register(MergeMethod(
    name="task_arithmetic",
    fn=merge_task_arithmetic,
    params=(shared.lam(),),
    reference="Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi, Farhadi 2023, "
              "'Editing Models with Task Arithmetic', arXiv 2212.04089",
    summary="exact λ·Σ wᵢΔWᵢ by concatenating factors (rank Σ rᵢ)",
    averages=False,
    needs_equal_ranks=False,
    takes_union_of_modules=True,
))
