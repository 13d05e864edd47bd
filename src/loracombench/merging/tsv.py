"""TSV-M (Task Singular Vectors: Merge): Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri,
Rodolà 2025, "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025,
arXiv 2412.00081 (reference code: AntoAndGar/task_singular_vectors).

Per module, with T tasks and their weighted updates wᵢΔWᵢ = Uᵢ diag(σᵢ) Vᵢᵀ:
1. keep each task's top kᵢ singular components (the paper: kᵢ = ⌊min(out, in)/T⌋);
2. concatenate them, U = [U₁ … U_T], σ = [σ₁ … σ_T], Vᵀ = [V₁ᵀ; …; V_Tᵀ];
3. decorrelate: replace U and Vᵀ by their orthogonal (Procrustes) factors U⊥, V⊥ᵀ, computed
   from their SVDs, so the tasks' singular vectors no longer overlap;
4. ΔW = α·U⊥ diag(σ) V⊥ᵀ, stored exactly as B = α·U⊥ diag(σ), A = V⊥ᵀ (rank Σkᵢ ≤ Σrᵢ).
Each task's SVD comes from its factors (one QR and a small SVD), never from the dense ΔWᵢ.

Where ours differs from the reference code, and why:
- The 1/T rule sizes a full fine-tuning update. A rank-rᵢ LoRA update has only rᵢ components,
  and rᵢ ≤ ⌊min(out, in)/T⌋ in every realistic module, so the paper's rule keeps all of them,
  as the Core Space reference does in its (T·r)-sized core (⌊T·r/T⌋ = r). `fraction` keeps
  fewer: the top round(fraction·rᵢ) components (fraction = 1/T would apply "1/T" to the LoRA
  rank, which neither paper does). The paper's ⌊min(out, in)/T⌋ (at least 1) stays an upper bound.
- The reference takes the SVD of the dense ΔWᵢ; applied to a LoRA update, its components beyond
  rank rᵢ have zero singular value but arbitrary singular vectors, which enter its
  orthogonalisation and tilt the real ones. We drop numerically zero components, and the orthogonal factor skips directions
  the concatenation lacks (ops.polar_factor): for tasks whose singular vectors are linearly
  independent that is the reference's factor; for two identical adapters it gives that
  adapter back instead of adding arbitrary directions.
- α (`lam`) defaults to 1, as for task_arithmetic here: a data-free merge has no validation
  data to tune it on.
The weights scale the task updates before their SVDs (a negative weight flips Uᵢ).
"""

from __future__ import annotations

import torch

from loracombench.merging import params as shared
from loracombench.merging.factors import LoraFactors
from loracombench.merging.ops import drop_negligible, kept_count, polar_factor, svd_of_product, zero_update
from loracombench.merging.registry import MergeMethod, register

Components = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (U, σ, Vᵀ) of a thin SVD


def task_components(factors: list[LoraFactors], weights: list[float]) -> list[Components]:
    """Each task's SVD wᵢΔWᵢ = Uᵢ diag(σᵢ) Vᵢᵀ without its numerically zero components."""
    size = max(factors[0].lora_B.shape[0], factors[0].lora_A.shape[1])
    return [drop_negligible(*svd_of_product(w * f.scale * f.lora_B, f.lora_A), size)
            for f, w in zip(factors, weights)]


def decorrelated(parts: list[Components]) -> Components:
    """(U⊥, σ, V⊥ᵀ): the parts' singular vectors concatenated and orthogonalised, σ concatenated."""
    u = torch.cat([part[0] for part in parts], dim=1)
    s = torch.cat([part[1] for part in parts])
    vh = torch.cat([part[2] for part in parts], dim=0)
    return polar_factor(u), s, polar_factor(vh)


def leading(parts: list[Components], counts: list[int]) -> list[Components]:
    return [(u[:, :k], s[:k], vh[:k]) for (u, s, vh), k in zip(parts, counts)]


# Set by a caller that runs TSV-M on a change of basis of the module (Core Space's Σrᵢ-sized
# core): the module's own (out, in), which the paper's ⌊min(out, in)/T⌋ is about. In the core it
# would be ⌊Σrᵢ/T⌋, which cuts an adapter of more than the mean rank, or beside a missing one.
MODULE_SHAPE = "module_shape"


def merge_tsv(factors: list[LoraFactors], weights: list[float], params: dict, module: str):
    out_features, in_features = factors[0].lora_B.shape[0], factors[0].lora_A.shape[1]
    per_task_limit = max(1, min(params.get(MODULE_SHAPE, (out_features, in_features))) // len(factors))
    parts = task_components(factors, weights)
    counts = [min(kept_count(len(s), params["fraction"]), per_task_limit, len(s)) for _, s, _ in parts]
    if sum(counts) == 0:
        return zero_update(out_features, in_features), {"rank": 1, "kept_per_task": counts}
    u, s, vh = decorrelated(leading(parts, counts))
    return LoraFactors(vh, params["lam"] * u * s, 1.0), {"rank": len(s), "kept_per_task": counts}


register(MergeMethod(
    name="tsv",
    fn=merge_tsv,
    params=(
        shared.fraction("fraction", 1.0, "fraction of each task's rank kept (its top singular components); "
                        "1 = all, which is what the paper's ⌊min(out, in)/T⌋ keeps of a LoRA update"),
        shared.lam(),
    ),
    reference="Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodolà 2025, 'Task Singular Vectors: "
              "Reducing Task Interference in Model Merging', CVPR 2025, arXiv 2412.00081",
    summary="TSV-M: each task's top singular vectors, concatenated and decorrelated (Procrustes); exact factors",
    averages=True,
    needs_equal_ranks=False,
    takes_union_of_modules=True,
))
