"""Building blocks shared by the merge methods: pure functions of tensors.

"Stacked" tensors hold one task per index of dimension 0.
"""

from __future__ import annotations

import math

import scipy.linalg
import scipy.linalg.blas
import torch

from loracombench.merging.factors import LoraFactors
from loracombench.merging.registry import MergeError


def kept_count(numel: int, density: float) -> int:
    """How many entries a `density` fraction of `numel` keeps: rounded, at least one."""
    # floor(x + 0.5) rather than ceil: density·numel is often an integer plus float noise (0.2·10).
    return max(1, min(numel, math.floor(density * numel + 0.5)))


def trim_by_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the kept_count(density) entries of largest magnitude (TIES' "trim" step).

    Among entries tied at the threshold magnitude the lowest flat indices are kept, so the count
    is exact and the result deterministic.
    """
    flat = tensor.reshape(-1)
    keep_total = kept_count(flat.numel(), density)
    if keep_total >= flat.numel():
        return tensor.clone()
    magnitude = flat.abs()
    # A threshold and an index-ordered tie-break, rather than topk, whose choice among ties is unspecified.
    threshold = torch.kthvalue(magnitude, flat.numel() - keep_total + 1).values
    keep = magnitude > threshold
    tied = torch.nonzero(magnitude == threshold).squeeze(1)
    keep[tied[: keep_total - int(keep.sum())]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(tensor.shape)


def elect_sign(stacked: torch.Tensor, mode: str) -> torch.Tensor:
    """Per entry, the sign (+1/-1) the tasks agree on: of their sum ("sum", TIES' total mass) or of
    their sign count ("count"). A tie elects +1."""
    if mode == "sum":
        score = stacked.sum(dim=0)
    elif mode == "count":
        score = stacked.sign().sum(dim=0)
    else:
        raise MergeError(f"unknown sign mode {mode!r}; valid: sum, count")
    return torch.where(score >= 0, 1.0, -1.0).to(stacked.dtype)


def disjoint_mean(stacked: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Per entry, the mean over the tasks whose value has the elected sign; 0 where none has."""
    # Zero values never match a ±1 sign, so trimmed or dropped entries do not dilute the mean.
    agrees = stacked.sign() == signs
    total = (stacked * agrees).sum(dim=0)
    return total / agrees.sum(dim=0).clamp(min=1)


def sign_consensus_mean(stacked: torch.Tensor, mode: str) -> torch.Tensor:
    """TIES' elect-then-disjoint-merge, without the trimming."""
    return disjoint_mean(stacked, elect_sign(stacked, mode))


def random_drop(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability `density` and rescale by 1/density (DARE), so the
    expectation is the input."""
    draws = torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype, device=tensor.device)
    return tensor * (draws < density) / density


def svd_of_product(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, S, Vh) of left @ right without forming it.

    left is (m, k) and right (k, n) with k small: a QR of `left`, one of `right`ᵀ and the SVD of
    the small product of their R factors give the exact decomposition, at most min(m, k, n)
    singular values. (Both QRs: LAPACK's SVD of a wide k × n matrix costs several times a QR.)
    """
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
    return q_left @ u, s, vh @ q_right.T


def significant(singular: torch.Tensor, scale: float | torch.Tensor | None, size: int) -> torch.Tensor:
    """Mask of the singular values above rounding noise: larger than scale·size·eps.

    `scale` is the size of what was decomposed (default: its largest singular value, 0 when there
    is none) and `size` its largest dimension. The singular vectors of the values below are
    arbitrary, so the methods that build on singular vectors drop them.
    """
    if scale is None:
        scale = singular[0] if singular.numel() else 0.0
    return singular > float(scale) * size * torch.finfo(singular.dtype).eps


def drop_negligible(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, size: int,
                    scale: float | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD (u, s, vh) without its components below significant()."""
    keep = significant(s, scale, size)
    return u[:, keep], s[keep], vh[keep]


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal (Procrustes) factor P·Qᵀ of matrix = P·Σ·Qᵀ: the matrix with orthonormal
    columns (or rows, if wide) nearest to `matrix` in Frobenius norm.

    Directions with numerically zero singular values are left out (a partial isometry), because
    their P and Q are arbitrary: for full-rank input this is the usual polar factor, for
    rank-deficient input the unique one that adds no direction the input lacks.
    """
    wide = matrix.shape[0] < matrix.shape[1]
    tall = matrix.T if wide else matrix  # LAPACK decomposes tall matrices faster
    p, _, qh = drop_negligible(*torch.linalg.svd(tall, full_matrices=False), max(matrix.shape))
    return (p @ qh).T if wide else p @ qh


def zero_update(out_features: int, in_features: int) -> LoraFactors:
    """A zero update stored as rank-1 factors (PEFT has no rank-0 adapter)."""
    return LoraFactors(torch.zeros(1, in_features, dtype=torch.float64),
                       torch.zeros(out_features, 1, dtype=torch.float64), 1.0)


def truncated_svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A the best rank-`rank` approximation of `delta` (Eckart–Young).

    B = U_k·S_k (out×k) carries the singular values and A = V_kᵀ (k×in) has orthonormal rows,
    the layout PEFT's SVD merge uses. U_k are the leading eigenvectors of the smaller Gram matrix,
    from LAPACK's subset eigensolver (several times faster on CPU than torch's full SVD).
    B @ A is the projection of `delta` onto span U_k, so it is exact to rounding given U_k.
    """
    wide = delta.shape[0] <= delta.shape[1]
    matrix = delta if wide else delta.T
    size = matrix.shape[0]
    rank = min(rank, *matrix.shape)
    columns = matrix.cpu().numpy().T
    # syrk fills one triangle of matrix·matrixᵀ, half the work of a matmul; eigh reads only that one.
    gram = scipy.linalg.blas.get_blas_funcs("syrk", (columns,))(1.0, columns, trans=1, lower=0)
    _, vectors = scipy.linalg.eigh(gram, lower=False, subset_by_index=[size - rank, size - 1],
                                   driver="evr", check_finite=False)
    basis = torch.from_numpy(vectors[:, ::-1].copy()).to(matrix)  # LAPACK sorts ascending
    coordinates = basis.T @ matrix  # row i is s_i·v_iᵀ
    singular = coordinates.norm(dim=1)
    unit_rows = coordinates / singular.clamp(min=torch.finfo(delta.dtype).tiny)[:, None]
    if wide:
        return unit_rows, basis * singular
    return basis.T, unit_rows.T * singular


def concat_factors(factors: list[LoraFactors], coefficients: list[float]) -> LoraFactors:
    """Factors of Σ cᵢ·ΔWᵢ stored exactly: rows of A and columns of B concatenated, scale 1."""
    lora_A = torch.cat([f.lora_A for f in factors], dim=0)
    lora_B = torch.cat([c * f.scale * f.lora_B for f, c in zip(factors, coefficients)], dim=1)
    return LoraFactors(lora_A, lora_B, 1.0)


def relative_residual(target: torch.Tensor, approximation: torch.Tensor) -> float:
    """‖target - approximation‖_F / ‖target‖_F, 0 for a zero target."""
    norm = float(torch.linalg.norm(target))
    return float(torch.linalg.norm(target - approximation)) / norm if norm > 0 else 0.0
