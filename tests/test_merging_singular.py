"""Laws of the singular-basis merges: Core Space, TSV-M, Iso-C and Iso-CTS, on tiny float64 adapters."""

from __future__ import annotations

import pytest
import torch

from loracombench.merging import MergeError, merge_modules
from loracombench.merging.core_space import core_bases, core_factors
from loracombench.merging.factors import LoraFactors
from loracombench.merging.tsv import decorrelated, task_components


def factors(rank: int, in_features: int, out_features: int, scale: float = 1.0, seed: int = 0) -> LoraFactors:
    generator = torch.Generator().manual_seed(seed)
    return LoraFactors(torch.randn(rank, in_features, generator=generator, dtype=torch.float64),
                       torch.randn(out_features, rank, generator=generator, dtype=torch.float64), scale)


def merged(method: str, adapters: list[LoraFactors], weights=None, params=None) -> tuple[LoraFactors, dict]:
    result, info = merge_modules(method, {"m": adapters}, weights, params)
    return result["m"], info["per_module"]["m"]


def merged_update(method: str, adapters: list[LoraFactors], weights=None, params=None) -> torch.Tensor:
    return merged(method, adapters, weights, params)[0].delta_weight().double()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.norm(actual - expected) / torch.linalg.norm(expected))


def weighted_sum(adapters: list[LoraFactors], weights: list[float]) -> torch.Tensor:
    return sum(w * f.delta_weight() for f, w in zip(adapters, weights))


def flat_part(update: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-`rank` polar part U_r V_rᵀ of `update` and its singular values, from a dense SVD."""
    u, s, vh = torch.linalg.svd(update, full_matrices=False)
    return u[:, :rank] @ vh[:rank], s


def naive_ties(tasks: torch.Tensor, density: float) -> torch.Tensor:
    """TIES written out plainly: keep each task's largest entries, elect the sign of the sum, mean of agreeing."""
    trimmed = torch.zeros_like(tasks)
    for i, task in enumerate(tasks):
        keep = task.abs().flatten().topk(round(density * task.numel())).indices
        trimmed[i].view(-1)[keep] = task.flatten()[keep]
    sign = torch.where(trimmed.sum(dim=0) >= 0, 1.0, -1.0).to(tasks.dtype)
    agrees = (trimmed * sign > 0).to(tasks.dtype)
    return (trimmed * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)


# Two tasks of rank 2 and 3 in an 8×9 module, with different scales and a negative weight.
ADAPTERS = [factors(2, 9, 8, 2.0, seed=1), factors(3, 9, 8, 0.5, seed=2)]
WEIGHTS = [0.9, -0.4]
EQUAL_RANKS = [factors(2, 9, 8, 2.0, seed=3), factors(2, 9, 8, 0.5, seed=4)]
# Beside a missing adapter (a zero update) the core is only as large as the one that is there.
ONE_MISSING = [factors(3, 9, 8, 2.0, seed=5), None]


# --- Core Space -------------------------------------------------------------------------------

def test_core_projection_reconstructs_every_task_exactly():
    u_b, v_a = core_bases(ADAPTERS)
    assert u_b.shape == (8, 5) and v_a.shape == (9, 5)  # K = Σrᵢ = 5 on both sides
    torch.testing.assert_close(u_b.T @ u_b, torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(v_a.T @ v_a, torch.eye(5, dtype=torch.float64))
    for adapter, core in zip(ADAPTERS, core_factors(ADAPTERS, u_b, v_a)):
        assert core.delta_weight().shape == (5, 5)
        torch.testing.assert_close(u_b @ core.delta_weight() @ v_a.T, adapter.delta_weight(), atol=1e-12, rtol=0)


def test_core_space_with_task_arithmetic_is_task_arithmetic():
    core = merged_update("core_space", ADAPTERS, WEIGHTS, {"merge": "ta", "lam": 0.7})
    assert relative_error(core, 0.7 * weighted_sum(ADAPTERS, WEIGHTS)) < 1e-6


@pytest.mark.parametrize("adapters", [EQUAL_RANKS, ADAPTERS, ONE_MISSING], ids=["equal", "unequal", "missing"])
@pytest.mark.parametrize("inner", ["tsv", "iso_c"])
def test_core_space_with_a_basis_free_method_equals_that_method_in_full_space(inner, adapters):
    """TSV-M and Iso-C use only sums and singular vectors, which an orthonormal basis carries
    along; TSV-M's ⌊min(out, in)/T⌋ components per task are counted in the module, not the core
    (⌊5/2⌋ = 2 there would cut the rank-3 adapter, and ⌊3/2⌋ = 1 the one beside a missing one)."""
    core = merged_update("core_space", adapters, WEIGHTS, {"merge": inner})
    assert relative_error(core, merged_update(inner, adapters, WEIGHTS)) < 1e-6


def test_core_space_ties_is_project_ties_reconstruct():
    # 25 core entries per task; density 0.6 keeps 15, an integer, so no rounding question arises.
    params = {"merge": "ties", "density": 0.6, "lam": 1.5}
    actual, details = merged("core_space", ADAPTERS, WEIGHTS, params)
    stacked_b = torch.cat([f.scale * f.lora_B for f in ADAPTERS], dim=1)
    stacked_a = torch.cat([f.lora_A for f in ADAPTERS], dim=0)
    u_b = torch.linalg.svd(stacked_b, full_matrices=False).U
    v_a = torch.linalg.svd(stacked_a, full_matrices=False).Vh.T
    cores = torch.stack([w * u_b.T @ f.delta_weight() @ v_a for f, w in zip(ADAPTERS, WEIGHTS)])
    expected = 1.5 * u_b @ naive_ties(cores, 0.6) @ v_a.T
    assert relative_error(actual.delta_weight().double(), expected) < 1e-5
    assert actual.rank <= 5 and details["core_shape"] == [5, 5]
    assert relative_error(expected, 1.5 * weighted_sum(ADAPTERS, WEIGHTS)) > 0.05  # TIES changed something


def test_core_space_with_ties_differs_from_ties_in_the_full_space():
    # The core basis is the point: trimming and sign election act on other coordinates.
    params = {"merge": "ties", "density": 0.5}
    core = merged_update("core_space", ADAPTERS, WEIGHTS, params)
    assert relative_error(core, merged_update("ties", ADAPTERS, WEIGHTS, {"density": 0.5})) > 0.05


# --- TSV-M ------------------------------------------------------------------------------------

def orthogonal_adapters(ranks: list[int], in_features: int, out_features: int) -> list[LoraFactors]:
    """Adapters whose column spaces are mutually orthogonal, and whose row spaces are too."""
    generator = torch.Generator().manual_seed(5)
    left = torch.linalg.qr(torch.randn(out_features, sum(ranks), generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(in_features, sum(ranks), generator=generator, dtype=torch.float64))[0]
    adapters, start = [], 0
    for rank in ranks:
        block = slice(start, start + rank)
        mixing = torch.randn(rank, rank, generator=generator, dtype=torch.float64)
        adapters.append(LoraFactors(mixing @ right[:, block].T, left[:, block] * 3.0, 0.5))
        start += rank
    return adapters


def test_tsv_of_mutually_orthogonal_updates_is_their_weighted_sum():
    adapters = orthogonal_adapters([2, 1, 2], in_features=11, out_features=10)  # ranks <= ⌊10/3⌋
    weights = [1.0, -2.0, 0.5]
    actual = merged_update("tsv", adapters, weights, {"lam": 0.8})
    assert relative_error(actual, 0.8 * weighted_sum(adapters, weights)) < 1e-6


def test_tsv_recombined_singular_vectors_are_orthonormal():
    u, s, vh = decorrelated(task_components(ADAPTERS, WEIGHTS))
    assert len(s) == 5
    torch.testing.assert_close(u.T @ u, torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(vh @ vh.T, torch.eye(5, dtype=torch.float64))
    # The stored factors are exactly these: A = V⊥ᵀ, B = α·U⊥·diag(σ).
    result, details = merged("tsv", ADAPTERS, WEIGHTS, {"lam": 2.0})
    torch.testing.assert_close(result.lora_A.double(), vh, atol=1e-6, rtol=0)
    torch.testing.assert_close(result.lora_B.double(), 2.0 * u * s, atol=1e-5, rtol=1e-6)
    assert details["kept_per_task"] == [2, 3]
    # Decorrelation moved the tasks' vectors: the result is not their plain sum.
    assert relative_error(result.delta_weight().double(), 2.0 * weighted_sum(ADAPTERS, WEIGHTS)) > 0.05


def test_tsv_fraction_keeps_each_tasks_top_components():
    adapter = factors(4, 9, 8, seed=6)
    u, s, vh = torch.linalg.svd(adapter.delta_weight(), full_matrices=False)
    half = merged_update("tsv", [adapter], params={"fraction": 0.5})
    assert relative_error(half, (u[:, :2] * s[:2]) @ vh[:2]) < 1e-6


# --- Iso-C and Iso-CTS ------------------------------------------------------------------------

def test_iso_c_flattens_the_spectrum_of_the_sum_to_its_mean():
    summed = weighted_sum(ADAPTERS, WEIGHTS)
    polar, singular = flat_part(summed, 5)
    mean = singular[:5].mean()
    result, details = merged("iso_c", ADAPTERS, WEIGHTS, {"lam": 1.3})
    update = result.delta_weight().double()
    spectrum = torch.linalg.svdvals(update)
    torch.testing.assert_close(spectrum[:5], torch.full((5,), float(1.3 * mean), dtype=torch.float64),
                               atol=1e-5, rtol=1e-6)
    assert float(spectrum[5:].max()) < 1e-5  # no direction outside the sum's span
    assert relative_error(update, 1.3 * mean * polar) < 1e-6  # and the sum's own singular vectors
    assert result.rank == 5 and details["mean_singular_value"] == pytest.approx(float(mean), rel=1e-9)


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_one_adapter_is_not_returned_but_isotropised(method):
    # The identity law cannot hold here: both methods flatten the spectrum by definition.
    adapter = factors(3, 7, 5, 2.0, seed=7)
    polar, singular = flat_part(adapter.delta_weight(), 3)
    actual = merged_update(method, [adapter], [1.0])
    assert relative_error(actual, singular[:3].mean() * polar) < 1e-6
    assert relative_error(actual, adapter.delta_weight()) > 0.05


def dense_iso_cts(updates: list[torch.Tensor], common_fraction: float) -> torch.Tensor:
    """The reference's Iso-CTS written densely, its dimension d taken as min(out, in, Σrᵢ) = Σrᵢ here."""
    tasks = len(updates)
    dimension = 6
    per_task = round((dimension - int(dimension * common_fraction)) / tasks)
    common = dimension - tasks * per_task
    u, s, vh = torch.linalg.svd(sum(updates), full_matrices=False)
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    for update in updates:
        residual = update - u[:, :common] @ u[:, :common].T @ update
        u_t, s_t, vh_t = torch.linalg.svd(residual, full_matrices=False)
        us.append(u_t[:, :per_task])
        ss.append(s_t[:per_task])
        vhs.append(vh_t[:per_task])

    def orthogonal(matrix):
        p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
        return p @ qh

    return orthogonal(torch.cat(us, dim=1)) * torch.cat(ss).mean() @ orthogonal(torch.cat(vhs, dim=0))


def test_iso_cts_matches_a_dense_implementation_of_the_reference():
    adapters = [factors(3, 10, 12, seed=8), factors(3, 10, 12, seed=9)]
    actual, details = merged("iso_cts", adapters, params={"common_fraction": 0.8})
    # d = 6: common int(4.8) = 4, then 2 left, 1 per task.
    assert (details["common"], details["per_task"]) == (4, [1, 1])
    expected = dense_iso_cts([f.delta_weight() for f in adapters], 0.8)
    assert relative_error(actual.delta_weight().double(), expected) < 1e-6
    spectrum = torch.linalg.svdvals(expected)
    torch.testing.assert_close(spectrum[:6], spectrum[:1].expand(6))  # flat over all 6 directions


def test_iso_cts_with_only_a_common_subspace_is_iso_c():
    cts = merged_update("iso_cts", ADAPTERS, WEIGHTS, {"common_fraction": 1.0, "lam": 0.5})
    assert relative_error(cts, merged_update("iso_c", ADAPTERS, WEIGHTS, {"lam": 0.5})) < 1e-6


# --- Output form and parameters ---------------------------------------------------------------

@pytest.mark.parametrize("method, params", [
    ("tsv", {}), ("iso_c", {}), ("iso_cts", {}),
    ("core_space", {"merge": "ta"}), ("core_space", {"merge": "ties"}),
    ("core_space", {"merge": "tsv"}), ("core_space", {"merge": "iso_c"}),
])
def test_results_are_stored_exactly_at_the_sum_of_ranks(method, params):
    """Generic rank-2 and rank-3 updates span 5 directions; every method here keeps all of them
    (none truncates), so the stored update has rank 5, no more (it fits the factors' shapes)."""
    adapters = [factors(2, 40, 30, seed=10), factors(3, 40, 30, seed=11)]
    result, info = merge_modules(method, {"m": adapters}, params=params)
    stored = result["m"].delta_weight().double()  # fp32 factors: singular values below 1e-5 are rounding
    assert info["output_ranks"]["m"] == 5 == int(torch.linalg.matrix_rank(stored, rtol=1e-5))
    assert info.get("max_relative_error", 0.0) == 0.0


def test_an_all_zero_module_gives_a_zero_rank_one_update():
    zero = LoraFactors(torch.zeros(2, 6, dtype=torch.float64), torch.zeros(5, 2, dtype=torch.float64), 1.0)
    for method in ("tsv", "iso_c", "iso_cts", "core_space"):
        result, _ = merged(method, [zero, zero])
        assert result.rank == 1 and not result.delta_weight().any()


@pytest.mark.parametrize("method, raw, named", [
    ("core_space", {"merge": "dare"}, ["'merge'", "ta, ties, tsv, iso_c"]),
    ("tsv", {"fraction": 0}, ["'fraction'", "(0, 1]"]),
    ("iso_cts", {"common_fraction": 2}, ["'common_fraction'", "[0, 1]"]),
    ("iso_c", {"lam": "nan"}, ["'lam'", "finite"]),
])
def test_bad_parameters_name_the_parameter_and_its_valid_values(method, raw, named):
    with pytest.raises(MergeError) as raised:
        merge_modules(method, {"m": ADAPTERS}, params=raw)
    assert all(text in str(raised.value) for text in named)
