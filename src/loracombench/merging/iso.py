"""Isotropic merging, Iso-C and Iso-CTS: Marczak, Magistri, Cygert, Twardowski, Bagdanov,
van de Weijer 2025, "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces", ICML 2025, arXiv 2502.04959 (reference code: danielm1405/iso-merging).

Task arithmetic's sum Σ wᵢΔWᵢ = U diag(σ) Vᵀ has a few dominant directions that drown the rest.
- Iso-C flattens its spectrum: ΔW = α·σ̄·U Vᵀ, σ̄ the mean singular value of the sum.
- Iso-CTS keeps the top `common` directions of the sum (the common subspace), adds each task's
  top `per_task` directions of what the common subspace misses, (I - U_c U_cᵀ)·wᵢΔWᵢ, then
  orthogonalises the concatenated singular vectors (Procrustes, as in TSV-M, see tsv.py) and
  flattens all their singular values to the mean. Sizes as in the reference: common =
  int(d·common_fraction), and d - common rounded to a multiple of T, so every task gets as many.
Both are stored exactly as factors, B = α·σ̄·U, A = Vᵀ, of rank at most Σrᵢ; the sum's SVD comes
from its concatenated factors (one QR and a small SVD).

Where ours differs from the reference code, and why:
- The spectrum is the sum's numerically nonzero singular values, at most Σrᵢ of them. The
  reference decomposes a dense full fine-tuning update and averages all min(out, in) values; for
  a LoRA sum the other min(out, in) - Σrᵢ are zero, and including them would shrink σ̄ by that
  ratio and fill directions no task touched with arbitrary singular vectors. Averaging over the
  nonzero ones is what the Core Space reference computes when it isotropises its (generically
  full-rank) Σrᵢ × Σrᵢ core.
- Iso-CTS sizes its subspaces from d = min(out, in, Σrᵢ), the dimension the tasks' updates span,
  not from min(out, in): with the latter, the common subspace (80% of min(out, in)) would contain
  every direction of every task and leave no task-specific residual at all.
- α (`lam`) defaults to 1: the paper selects α per model and number of tasks on validation
  data, which a data-free merge does not have. Sweep `lam` to reproduce that selection.
- The weights scale each task before summing (the reference weighs all tasks equally).
"""

from __future__ import annotations

import torch

from loracombench.merging import params as shared
from loracombench.merging.factors import LoraFactors
from loracombench.merging.ops import concat_factors, drop_negligible, svd_of_product, zero_update
from loracombench.merging.registry import MergeMethod, register
from loracombench.merging.tsv import Components, decorrelated, task_components

REFERENCE = ("Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer 2025, 'No Task Left Behind: "
             "Isotropic Model Merging with Common and Task-Specific Subspaces', ICML 2025, arXiv 2502.04959")


def summed_components(factors: list[LoraFactors], weights: list[float]) -> Components:
    """The SVD of Σ wᵢΔWᵢ without its numerically zero components."""
    summed = concat_factors(factors, weights)
    size = max(summed.lora_B.shape[0], summed.lora_A.shape[1])
    return drop_negligible(*svd_of_product(summed.lora_B, summed.lora_A), size)


def isotropic(components: Components, lam: float) -> tuple[LoraFactors, dict]:
    """Factors of α·σ̄·U Vᵀ (a zero update when there are no components)."""
    u, s, vh = components
    if not s.numel():
        return zero_update(u.shape[0], vh.shape[1]), {"rank": 1, "mean_singular_value": 0.0}
    mean = s.mean()
    return LoraFactors(vh, lam * mean * u, 1.0), {"rank": len(s), "mean_singular_value": float(mean)}


def merge_iso_c(factors: list[LoraFactors], weights: list[float], params: dict, module: str):
    return isotropic(summed_components(factors, weights), params["lam"])


def subspace_sizes(dimension: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common, per_task) with common + tasks·per_task = dimension, per_task as in the reference,
    capped so that common stays >= 0."""
    per_task = min(dimension // tasks, round((dimension - int(dimension * common_fraction)) / tasks))
    return dimension - tasks * per_task, per_task


def task_specific(task: Components, common_u: torch.Tensor, count: int, size: int) -> Components:
    """The top `count` components of the task's update outside the common subspace."""
    u, s, vh = task
    left = u * s
    residual = left - common_u @ (common_u.T @ left)
    # Relative to the task's own size: a task inside the common subspace leaves only rounding noise.
    scale = s[0] if s.numel() else 0.0
    u_r, s_r, vh_r = drop_negligible(*svd_of_product(residual, vh), size, scale)
    return u_r[:, :count], s_r[:count], vh_r[:count]


def merge_iso_cts(factors: list[LoraFactors], weights: list[float], params: dict, module: str):
    u, s, vh = summed_components(factors, weights)
    out_features, in_features = u.shape[0], vh.shape[1]
    dimension = min(out_features, in_features, sum(f.rank for f in factors))
    common, per_task = subspace_sizes(dimension, len(factors), params["common_fraction"])
    common_part = (u[:, :common], s[:common], vh[:common])
    size = max(out_features, in_features)
    specific = [task_specific(task, common_part[0], per_task, size) for task in task_components(factors, weights)]
    merged, info = isotropic(decorrelated([common_part, *specific]), params["lam"])
    return merged, {**info, "common": len(common_part[1]), "per_task": [len(part[1]) for part in specific]}


register(MergeMethod(
    name="iso_c",
    fn=merge_iso_c,
    params=(shared.lam(),),
    reference=REFERENCE,
    summary="Iso-C: Σ wᵢΔWᵢ with its singular values flattened to their mean; exact factors",
    averages=False,
    needs_equal_ranks=False,
    takes_union_of_modules=True,
))

register(MergeMethod(
    name="iso_cts",
    fn=merge_iso_cts,
    params=(
        shared.fraction("common_fraction", 0.8, "share of the d = min(out, in, Σrᵢ) directions taken from "
                        "the sum (common subspace); the rest is split equally among the tasks", zero_allowed=True),
        shared.lam(),
    ),
    reference=REFERENCE,
    summary="Iso-CTS: common subspace of the sum plus task-specific directions, orthogonalised, "
            "spectrum flattened; exact factors",
    averages=False,
    needs_equal_ranks=False,
    takes_union_of_modules=True,
))
