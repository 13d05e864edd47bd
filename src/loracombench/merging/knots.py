"""KnOTS: Stoica, Ramesh, Ecsedi, Choshen, Hoffman 2025, "Model merging with SVD to tie the Knots",
ICLR 2025, arXiv 2410.19735.

LoRA updates of different tasks are poorly aligned, so merging them entry by entry (TIES, DARE)
mixes unrelated coordinates. KnOTS first writes every task in one shared basis:
1. concatenate the task updates column-wise, [ΔW₁ … ΔWₙ] (out × n·in), and take its SVD,
   U Σ [V₁ᵀ … Vₙᵀ]: UΣ is a basis shared by all tasks and Vᵢᵀ (k × in) holds task i's
   coordinates in it, ΔWᵢ = UΣVᵢᵀ exactly;
2. merge the coordinates: merge=ta takes Σ wᵢVᵢᵀ (so ΔW = Σ wᵢΔWᵢ exactly, task arithmetic);
   merge=ties applies TIES to the weighted coordinates (trim each to `density`, elect signs,
   disjoint mean). As in the authors' code (task_merger.py, s_on_V=True in every config), the
   coordinates TIES sees are ΣVᵢᵀ, each row scaled by its singular value, so that the trim ranks
   entries by how much of ΔWᵢ they carry; coordinates=unit trims the unscaled Vᵢᵀ instead (as
   the Core Space authors' re-implementation does). Signs and the disjoint mean do not depend
   on the row scale, so the two differ only when density < 1;
3. map back, ΔW = U·(ΣV)_mergedᵀ (or UΣ·V_mergedᵀ), stored exactly as B and A, rank k ≤ Σ rᵢ.
The SVD comes from the factors, [ΔW₁ … ΔWₙ] = [s₁B₁ … sₙBₙ]·blockdiag(A₁, …, Aₙ), via one QR and
a small SVD. Components with numerically zero singular values are dropped: their rows of Vᵀ are
arbitrary unit vectors that would otherwise compete in TIES' magnitude trimming.
The paper merges the V's with TIES or DARE-TIES. Density defaults to 1 (no trimming), as the
authors' LLaMA-3-8B configs set it (topK 100; their ViT configs keep 20%), so the default is TIES'
sign-consensus mean taken in the aligned basis. Their scaling coefficient (0.5 for LLaMA) is the
per-task weights here. They trim over all layers at once; here each module is trimmed alone, as
`ties` does.
"""

from __future__ import annotations

import torch

from loracombench.merging import params as shared
from loracombench.merging.factors import LoraFactors
from loracombench.merging.ops import significant, svd_of_product
from loracombench.merging.registry import MergeMethod, register
from loracombench.merging.ties import ties_combine

MERGES = ("ties", "ta")
COORDINATES = ("scaled", "unit")


def shared_basis(factors: list[LoraFactors], coordinates: str = "scaled") -> tuple[torch.Tensor, torch.Tensor]:
    """(basis, stacked task coordinates of shape (n, k, in)) of the column-wise concatenated
    updates, basis @ coordinates[i] = ΔWᵢ: (U, ΣVᵢᵀ) when `coordinates` is scaled, (UΣ, Vᵢᵀ) when unit."""
    folded = [f.folded() for f in factors]
    u, s, vh = svd_of_product(torch.cat([f.lora_B for f in folded], dim=1),
                              torch.block_diag(*[f.lora_A for f in folded]))
    keep = significant(s, s[0], max(vh.shape))
    keep[0] = True  # an all-zero module still gives a (zero) rank-1 adapter rather than rank 0
    u, s, vh = u[:, keep], s[keep], vh[keep]
    in_features = factors[0].lora_A.shape[1]
    if coordinates == "scaled":
        vh = s[:, None] * vh
    else:
        u = u * s
    return u, vh.reshape(len(s), len(factors), in_features).transpose(0, 1)


def merge_knots(factors: list[LoraFactors], weights: list[float], params: dict, module: str):
    basis, coordinates = shared_basis(factors, params["coordinates"])
    weighted = coordinates * torch.tensor(weights, dtype=coordinates.dtype)[:, None, None]
    if params["merge"] == "ta":
        merged = weighted.sum(dim=0)
    else:
        merged = ties_combine(weighted, params["density"], params["sign_mode"])
    return LoraFactors(merged, basis, 1.0), {"rank": basis.shape[1]}


register(MergeMethod(
    name="knots",
    fn=merge_knots,
    params=(
        shared.choice("merge", "ties", MERGES, "how the tasks' coordinates in the shared basis are merged"),
        shared.density(1.0, "fraction of each task's coordinates kept by magnitude when merge=ties"),
        shared.choice("coordinates", "scaled", COORDINATES,
                      "what merge=ties trims: ΣVᵢᵀ as the authors' code does, or the unit-norm Vᵢᵀ"),
        shared.sign_mode(),
    ),
    reference="Stoica, Ramesh, Ecsedi, Choshen, Hoffman 2025, 'Model merging with SVD to tie the Knots', "
              "ICLR 2025, arXiv 2410.19735",
    summary="SVD of the concatenated updates gives a shared basis; the task coordinates are merged in it",
    averages=True,
    needs_equal_ranks=False,
    takes_union_of_modules=True,
))
