"""Tensorized fusion: a truncated Tucker decomposition (HOSVD) of the stacked task updates,
merged in its core. It is one concrete form of the "tensorized LoRA fusion" that the original
project left as future work.

Per module the n task updates form a 3-way tensor T (n × out × in), T[i] = ΔWᵢ. The truncated
higher-order SVD (De Lathauwer, De Moor, Vandewalle 2000, "A Multilinear Singular Value
Decomposition", SIAM J. Matrix Anal. Appl. 21(4); the Tucker model is from Tucker 1966, "Some
mathematical notes on three-mode factor analysis", Psychometrika 31(3)) gives
- U_out (out × k₁): leading left singular vectors of the mode-out unfolding [ΔW₁ … ΔWₙ];
- U_in (in × k₂): leading left singular vectors of the mode-in unfolding [ΔW₁ᵀ … ΔWₙᵀ];
- the task mode uncompressed, and the core G[i] = U_outᵀ ΔWᵢ U_in (k₁ × k₂).
The tasks are merged in the core, G_m = Σ wᵢG[i] (merge=sum) or Σ wᵢG[i] / Σ wᵢ (merge=mean),
and ΔW = U_out G_m U_inᵀ, stored as B = U_out, A = G_m U_inᵀ (rank k₁) or as B = U_out G_m,
A = U_inᵀ (rank k₂), whichever rank is smaller.

rank_out = k₁ and rank_in = k₂ default to 0, meaning all min(out, Σ rᵢ) and min(in, Σ rᵢ)
components: the decomposition is then lossless and merge=sum equals task arithmetic. Smaller
ranks keep only the directions that carry most of the tasks' updates jointly. info records
k₁, k₂, the relative Frobenius error of the Tucker approximation of T, and relative_error: the
merged update against the same merge at full rank, Σ cᵢΔWᵢ. This is the one-pass
HOSVD, not the iterated optimum (HOOI). Each unfolding's singular vectors come from the factors
(one QR and a small SVD, as in knots), never from the dense unfolding.
"""

from __future__ import annotations

import torch

from loracombench.merging import params as shared
from loracombench.merging.factors import LoraFactors
from loracombench.merging.ops import relative_residual, svd_of_product
from loracombench.merging.registry import MergeError, MergeMethod, register

MERGES = ("sum", "mean")


def leading_left_vectors(lefts: list[torch.Tensor], rights: list[torch.Tensor], rank: int) -> torch.Tensor:
    """The `rank` leading left singular vectors of [L₁R₁ … LₙRₙ] (all when rank is 0)."""
    u, _, _ = svd_of_product(torch.cat(lefts, dim=1), torch.block_diag(*rights))
    return u[:, : rank or u.shape[1]]


def core_coefficients(weights: list[float], merge: str, module: str) -> list[float]:
    if merge == "sum":
        return weights
    if sum(weights) == 0:
        raise MergeError(f"tucker: the weights sum to 0 (module {module}), so merge=mean is undefined")
    return [w / sum(weights) for w in weights]


def merge_tucker(factors: list[LoraFactors], weights: list[float], params: dict, module: str):
    folded = [f.folded() for f in factors]
    u_out = leading_left_vectors([f.lora_B for f in folded], [f.lora_A for f in folded], params["rank_out"])
    u_in = leading_left_vectors([f.lora_A.T for f in folded], [f.lora_B.T for f in folded], params["rank_in"])
    cores = torch.stack([(u_out.T @ f.lora_B) @ (f.lora_A @ u_in) for f in folded])
    coefficients = torch.tensor(core_coefficients(weights, params["merge"], module), dtype=cores.dtype)
    core = (coefficients[:, None, None] * cores).sum(dim=0)
    if u_out.shape[1] <= u_in.shape[1]:
        merged = LoraFactors(core @ u_in.T, u_out, 1.0)
    else:
        merged = LoraFactors(u_in.T, u_out @ core, 1.0)
    updates = torch.stack([f.delta_weight() for f in folded])
    error = relative_residual(updates, u_out @ cores @ u_in.T)
    # The merged update against the same core merge at full Tucker rank (Σ cᵢΔWᵢ): what the
    # truncation costs this row, reported beside its score like any compressed merge.
    exact = (coefficients[:, None, None] * updates).sum(dim=0)
    return merged, {"rank": merged.rank, "rank_out": u_out.shape[1], "rank_in": u_in.shape[1],
                    "tucker_relative_error": error, "relative_error": relative_residual(exact, merged.delta_weight())}


register(MergeMethod(
    name="tucker",
    fn=merge_tucker,
    params=(
        shared.choice("merge", "sum", MERGES, "how the tasks' core slices are combined"),
        shared.rank("Tucker rank of the output mode; 0 = min(out, Σ rᵢ), lossless", "rank_out"),
        shared.rank("Tucker rank of the input mode; 0 = min(in, Σ rᵢ), lossless", "rank_in"),
    ),
    reference="De Lathauwer, De Moor, Vandewalle 2000, 'A Multilinear Singular Value Decomposition', "
              "SIAM J. Matrix Anal. Appl. 21(4) (no arXiv id); Tucker 1966, Psychometrika 31(3)",
    summary="HOSVD of the (task × out × in) update tensor; task slices of the core merged, mapped back",
    averages=False,
    needs_equal_ranks=False,
    takes_union_of_modules=True,
))
