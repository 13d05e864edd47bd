"""Laws of the merge methods, on tiny random adapters."""

from __future__ import annotations

import pytest
import torch

from loracombench.merging import METHODS, MergeError, merge_modules
from loracombench.merging.factors import LoraFactors
from loracombench.merging.knots import shared_basis
from loracombench.merging.ops import trim_by_magnitude
from loracombench.merging.ties import ties_combine


def factors(rank: int, in_features: int, out_features: int, scale: float = 2.0, seed: int = 0) -> LoraFactors:
    generator = torch.Generator().manual_seed(seed)
    return LoraFactors(torch.randn(rank, in_features, generator=generator),
                       torch.randn(out_features, rank, generator=generator), scale)


def row(values: list[float]) -> LoraFactors:
    """A 1×n update stored as rank-1 factors: ΔW = [[1]] @ [values]."""
    return LoraFactors(torch.tensor([values]), torch.ones(1, 1), 1.0)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.norm(actual - expected) / torch.linalg.norm(expected))


def merged_update(method: str, adapters: list[LoraFactors], weights=None, params=None) -> torch.Tensor:
    merged, _ = merge_modules(method, {"m": adapters}, weights, params)
    return merged["m"].delta_weight()


def lossless_params(method: str) -> dict:
    """Parameters under which a method keeps a single adapter intact (no trimming or dropping)."""
    return {"density": 1.0} if any(p.name == "density" for p in METHODS[method].params) else {}


# Iso-C and Iso-CTS flatten the spectrum of whatever they merge, one adapter included, so they
# cannot give it back; test_merging_singular.py checks what they give instead.
RESHAPE_THE_SPECTRUM = {"iso_c", "iso_cts"}


def single_adapter_result(method: str, adapter: LoraFactors, weight: float, params: dict) -> torch.Tensor:
    """What `method` makes of one adapter at `weight`: the scaled update, unless it reshapes the spectrum."""
    if method in RESHAPE_THE_SPECTRUM:
        return merged_update(method, [adapter], [weight], params)
    return weight * adapter.delta_weight()


@pytest.mark.parametrize("method", sorted(set(METHODS) - RESHAPE_THE_SPECTRUM))
def test_one_adapter_at_weight_one_comes_back_unchanged(method):
    # scale 2 = lora_alpha 32 / r 16; rectangular so that in/out mix-ups show.
    modules = {"q": [factors(3, 7, 5, seed=1)], "v": [factors(3, 7, 4, seed=2)]}
    merged, info = merge_modules(method, modules, [1.0], lossless_params(method))
    for name, (original,) in modules.items():
        assert relative_error(merged[name].delta_weight(), original.delta_weight()) <= 1e-5
        assert merged[name].lora_A.dtype == merged[name].lora_B.dtype == torch.float32
    assert info["method"] == method and info["weights"] == [1.0]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_identical_adapters_average_or_add(method):
    # Rank 2 <= ⌊min(6, 5)/2⌋, so TSV's per-task limit keeps every component of both.
    adapter = factors(2, 6, 5, seed=3)
    params = lossless_params(method)
    expected = single_adapter_result(method, adapter, 1.0 if METHODS[method].averages else 2.0, params)
    actual = merged_update(method, [adapter, adapter], [1.0, 1.0], params)
    assert relative_error(actual, expected) <= 1e-5


@pytest.mark.parametrize("method", sorted(METHODS))
def test_inputs_are_left_untouched(method):
    adapters = [factors(2, 6, 5, seed=4), factors(2, 6, 5, scale=0.5, seed=5)]
    copies = [(f.lora_A.clone(), f.lora_B.clone()) for f in adapters]
    merge_modules(method, {"m": adapters}, [0.6, 0.4])
    for f, (lora_A, lora_B) in zip(adapters, copies):
        assert torch.equal(f.lora_A, lora_A) and torch.equal(f.lora_B, lora_B)


def test_task_arithmetic_is_the_exact_weighted_sum_at_rank_sum():
    adapters = [factors(2, 6, 5, 2.0, seed=6), factors(3, 6, 5, 0.25, seed=7), factors(1, 6, 5, 1.0, seed=8)]
    weights = [0.5, -1.5, 2.0]
    merged, info = merge_modules("task_arithmetic", {"m": adapters}, weights, {"lam": 0.8})
    expected = 0.8 * sum(w * f.delta_weight() for f, w in zip(adapters, weights))
    torch.testing.assert_close(merged["m"].delta_weight(), expected, atol=1e-6, rtol=0)
    assert merged["m"].rank == info["output_ranks"]["m"] == 6
    assert info["params"] == {"lam": 0.8}


def test_task_arithmetic_takes_the_union_of_modules():
    shared, only_first = factors(2, 6, 5, seed=9), factors(2, 6, 5, seed=10)
    second = factors(3, 6, 5, seed=11)
    merged, info = merge_modules("task_arithmetic", {"q": [shared, second], "k": [only_first, None]}, [1.0, 0.5])
    torch.testing.assert_close(merged["k"].delta_weight(), only_first.delta_weight(), atol=1e-6, rtol=0)
    torch.testing.assert_close(merged["q"].delta_weight(), shared.delta_weight() + 0.5 * second.delta_weight(),
                               atol=1e-6, rtol=0)
    assert info["output_ranks"] == {"q": 5, "k": 2}


def test_ties_treats_a_missing_module_as_a_zero_update():
    present = factors(2, 6, 5, seed=12)
    params = {"density": 0.5, "rank": 5}  # fixed: the default (sum of ranks) counts the zero adapter's rank
    with_gap = merged_update("ties", [present, None], params=params)
    with_zero = merged_update("ties", [present, LoraFactors(torch.zeros(2, 6), torch.zeros(5, 2))], params=params)
    torch.testing.assert_close(with_gap, with_zero)


def test_average_is_the_mean_of_the_factors():
    first, second = factors(3, 6, 5, 2.0, seed=13), factors(3, 6, 5, 2.0, seed=14)
    merged, _ = merge_modules("average", {"m": [first, second]}, [3.0, 1.0])
    average = merged["m"]
    torch.testing.assert_close(average.lora_A, (3 * first.lora_A + second.lora_A) / 4)
    torch.testing.assert_close(average.lora_B, (3 * first.lora_B + second.lora_B) / 4)
    assert average.scale == 2.0


def test_average_adds_cross_terms_to_the_own_terms():
    # mean(B)·mean(A) = (1/n²)(B₁A₁ + B₂A₂ + B₁A₂ + B₂A₁) for n = 2 and a shared scale s. So it is
    # not mean(ΔW) plus the cross terms: it is ¼ of the own terms plus ¼ of the cross terms, and
    # average - mean(ΔW) = (s/4)(B₁A₂ + B₂A₁) - (s/4)(B₁A₁ + B₂A₂).
    first, second = factors(3, 6, 5, 2.0, seed=15), factors(3, 6, 5, 2.0, seed=16)
    s = 2.0
    own = s * (first.lora_B @ first.lora_A + second.lora_B @ second.lora_A)
    cross = s * (first.lora_B @ second.lora_A + second.lora_B @ first.lora_A)
    average = merged_update("average", [first, second])
    torch.testing.assert_close(average, (own + cross) / 4, atol=1e-5, rtol=0)
    mean_update = (first.delta_weight() + second.delta_weight()) / 2
    torch.testing.assert_close(average - mean_update, (cross - own) / 4, atol=1e-5, rtol=0)


def test_average_without_normalising_sums_the_weighted_factors():
    first, second = factors(2, 6, 5, 1.5, seed=17), factors(2, 6, 5, 1.5, seed=18)
    merged, _ = merge_modules("average", {"m": [first, second]}, [0.5, 2.0], {"normalize": "false"})
    torch.testing.assert_close(merged["m"].lora_A, 0.5 * first.lora_A + 2.0 * second.lora_A)
    torch.testing.assert_close(merged["m"].lora_B, 0.5 * first.lora_B + 2.0 * second.lora_B)


def test_average_folds_different_scales_into_b():
    first, second = factors(2, 6, 5, 4.0, seed=19), factors(2, 6, 5, 0.5, seed=20)
    expected = ((4.0 * first.lora_B + 0.5 * second.lora_B) / 2) @ ((first.lora_A + second.lora_A) / 2)
    merged, _ = merge_modules("average", {"m": [first, second]})
    assert merged["m"].scale == 1.0
    torch.testing.assert_close(merged["m"].delta_weight(), expected, atol=1e-5, rtol=0)


def test_average_refuses_weights_that_sum_to_zero():
    with pytest.raises(MergeError, match="sum to 0"):
        merge_modules("average", {"m": [factors(2, 4, 3, seed=21), factors(2, 4, 3, seed=22)]}, [1.0, -1.0])


def test_svd_error_is_the_norm_of_the_dropped_singular_values():
    adapters = [factors(3, 8, 7, 2.0, seed=23), factors(2, 8, 7, 0.5, seed=24)]
    weights = [1.0, -0.7]
    merged, info = merge_modules("svd", {"m": adapters}, weights, {"rank": 2})
    exact = sum(w * f.delta_weight() for f, w in zip(adapters, weights)).double()
    singular = torch.linalg.svdvals(exact)
    residual = float(torch.linalg.norm(exact - merged["m"].delta_weight().double()))
    assert merged["m"].rank == info["output_ranks"]["m"] == 2
    assert residual == pytest.approx(float(torch.linalg.norm(singular[2:])), rel=1e-4)
    assert info["max_relative_error"] == pytest.approx(residual / float(torch.linalg.norm(singular)), rel=1e-4)


def test_svd_default_rank_is_the_largest_input_rank_and_is_lossless_above_the_sum():
    adapters = [factors(3, 8, 7, seed=25), factors(2, 8, 7, seed=26)]
    _, info = merge_modules("svd", {"m": adapters})
    assert info["output_ranks"]["m"] == 3
    merged, info = merge_modules("svd", {"m": adapters}, params={"rank": 100})
    assert info["output_ranks"]["m"] == 5  # the sum has rank 5 at most
    assert relative_error(merged["m"].delta_weight(), adapters[0].delta_weight() + adapters[1].delta_weight()) < 1e-5


# Three tasks with 1×4 updates, density 0.5 (keep 2 of 4 entries per task):
#   τ₁ = [ 4, -1,  0.5, -3  ] -> trimmed [ 4,  0, 0, -3]
#   τ₂ = [-2,  3, -0.2, -1  ] -> trimmed [-2,  3, 0,  0]
#   τ₃ = [ 3, -5,  2,    0.1] -> trimmed [ 3, -5, 0,  0]
# sum of trimmed = [5, -2, 0, -3] -> elected signs [+, -, + (tie), -]
# disjoint mean: [(4 + 3)/2, -5, 0 (nothing agrees), -3] = [3.5, -5, 0, -3]
# With sign_mode=count the signs of entry 1 are (0, +, -): a tie, so + is elected and the mean is 3.
TIES_TASKS = ([4.0, -1.0, 0.5, -3.0], [-2.0, 3.0, -0.2, -1.0], [3.0, -5.0, 2.0, 0.1])


def test_trimming_keeps_an_exact_count_and_breaks_ties_by_position():
    trimmed = trim_by_magnitude(torch.tensor([[0.5, -1.0], [1.0, -1.0]]), 0.5)
    torch.testing.assert_close(trimmed, torch.tensor([[0.0, -1.0], [1.0, 0.0]]))
    assert torch.count_nonzero(trim_by_magnitude(torch.randn(10, 10), 0.2)) == 20


def test_ties_matches_a_hand_computed_example():
    tasks = [row(values) for values in TIES_TASKS]
    actual = merged_update("ties", tasks, params={"density": 0.5})
    torch.testing.assert_close(actual, torch.tensor([[3.5, -5.0, 0.0, -3.0]]))
    counted = merged_update("ties", tasks, params={"density": 0.5, "sign_mode": "count", "lam": 2.0})
    torch.testing.assert_close(counted, 2.0 * torch.tensor([[3.5, 3.0, 0.0, -3.0]]))


def test_ties_applies_weights_before_the_sign_election():
    # Weight -1 flips τ₃ to [-3, 5, -2, -0.1], trimmed [-3, 5, 0, 0]; the sum of trimmed is
    # [-1, 8, 0, -3], signs [-, +, +, -]; disjoint mean [(-2 - 3)/2, (3 + 5)/2, 0, -3].
    tasks = [row(values) for values in TIES_TASKS]
    actual = merged_update("ties", tasks, [1.0, 1.0, -1.0], {"density": 0.5})
    torch.testing.assert_close(actual, torch.tensor([[-2.5, 4.0, 0.0, -3.0]]))


def test_dense_merges_are_exact_by_default():
    # The merged update of TIES, DARE and pruning is full rank: stored without loss by default.
    adapters = [factors(2, 9, 8, seed=27), factors(2, 9, 8, seed=28)]
    for method in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
        merged, info = merge_modules(method, {"m": adapters})
        assert info["output_ranks"]["m"] == 8 == min(9, 8)
        assert info["max_relative_error"] == 0.0
        assert torch.linalg.matrix_rank(merged["m"].delta_weight()) > 4  # beyond Σ rᵢ: not a projection


def test_exact_factors_reproduce_the_dense_update_bit_for_bit():
    from loracombench.merging.dense import exact_factors

    for shape in ((3, 7), (7, 3), (5, 5)):
        delta = torch.randn(*shape, dtype=torch.float64)
        stored = exact_factors(delta)
        assert stored.rank == min(shape)
        assert torch.equal(stored.delta_weight(), delta)


def test_ties_at_a_chosen_rank_records_the_truncation_error():
    adapters = [factors(2, 9, 8, seed=27), factors(2, 9, 8, seed=28)]
    merged, info = merge_modules("ties", {"m": adapters}, params={"rank": 4})
    exact, _ = merge_modules("ties", {"m": adapters})
    assert info["params"]["density"] == 0.2
    assert info["output_ranks"]["m"] == 4
    error = relative_error(merged["m"].delta_weight(), exact["m"].delta_weight())
    assert 0.0 < info["per_module"]["m"]["relative_error"] == info["max_relative_error"] < 1.0
    assert info["max_relative_error"] == pytest.approx(error, rel=1e-4)


def test_magnitude_prune_prunes_the_merged_update_not_each_task():
    # sum = [0, 2, 0.3, -4] -> keep the two largest: [0, 2, 0, -4]. Pruning each task first would
    # give [4, 0, 0, -3] + [-4, 3, 0, 0] = [0, 3, 0, -3].
    tasks = [row([4.0, -1.0, 0.5, -3.0]), row([-4.0, 3.0, -0.2, -1.0])]
    actual = merged_update("magnitude_prune", tasks, params={"density": 0.5})
    torch.testing.assert_close(actual, torch.tensor([[0.0, 2.0, 0.0, -4.0]]))


DARE_PARAMS = {"density": 0.5, "rank": 8}  # rank 8 = full for 8×8, so only the drop changes anything


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_reproducible_by_seed(method):
    adapters = [factors(2, 8, 8, seed=29), factors(2, 8, 8, seed=30)]
    first = merged_update(method, adapters, params={**DARE_PARAMS, "seed": 3})
    again = merged_update(method, adapters, params={**DARE_PARAMS, "seed": 3})
    other = merged_update(method, adapters, params={**DARE_PARAMS, "seed": 4})
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_dare_keeps_about_density_of_the_entries_rescaled():
    adapter = factors(2, 8, 8, seed=31)
    dropped = merged_update("dare_linear", [adapter], params=DARE_PARAMS)
    kept = dropped.abs() > 1e-5
    assert 0.3 < kept.float().mean() < 0.7
    torch.testing.assert_close(dropped[kept], 2.0 * adapter.delta_weight()[kept], atol=1e-4, rtol=1e-4)


def test_dare_draws_different_masks_for_same_shaped_modules():
    adapter = factors(2, 8, 8, seed=32)
    merged, _ = merge_modules("dare_linear", {"q": [adapter], "k": [adapter]}, params=DARE_PARAMS)
    assert not torch.equal(merged["q"].delta_weight().abs() > 1e-5, merged["k"].delta_weight().abs() > 1e-5)


def test_dare_linear_is_unbiased_over_seeds():
    adapters = [factors(2, 4, 3, seed=33), factors(1, 4, 3, 0.5, seed=34)]
    weights = [0.7, 1.3]
    params = {"density": 0.5, "rank": 3}
    runs = 2000
    total = sum(merged_update("dare_linear", adapters, weights, {**params, "seed": seed}) for seed in range(runs))
    expected = sum(w * f.delta_weight() for f, w in zip(adapters, weights))
    # Each entry's mean has standard deviation |x|·sqrt((1/density - 1)/runs) ≈ 0.022|x|.
    assert relative_error(total / runs, expected) < 0.06


def test_dare_ties_at_full_density_is_ties_without_trimming():
    adapters = [factors(2, 6, 5, seed=35), factors(2, 6, 5, seed=36), factors(2, 6, 5, seed=37)]
    weights = [1.0, -0.5, 2.0]
    dare = merged_update("dare_ties", adapters, weights, {"density": 1.0, "rank": 5})
    ties = merged_update("ties", adapters, weights, {"density": 1.0, "rank": 5})
    torch.testing.assert_close(dare, ties)


@pytest.mark.parametrize("coordinates", ["scaled", "unit"])
def test_knots_basis_reproduces_every_task(coordinates):
    adapters = [factors(2, 7, 6, 2.0, seed=38), factors(3, 7, 6, 0.5, seed=39)]
    basis, task_coordinates = shared_basis(adapters, coordinates)
    for adapter, own in zip(adapters, task_coordinates):
        torch.testing.assert_close(basis @ own, adapter.delta_weight(), atol=1e-5, rtol=0)
    # scaled: an orthonormal basis, the singular values on the coordinates; unit: the reverse
    orthonormal = basis if coordinates == "scaled" else torch.cat(list(task_coordinates), dim=1).T
    torch.testing.assert_close(orthonormal.T @ orthonormal, torch.eye(orthonormal.shape[1]), atol=1e-5, rtol=0)


def test_knots_with_task_arithmetic_equals_task_arithmetic():
    adapters = [factors(2, 7, 6, 2.0, seed=40), factors(3, 7, 6, 0.5, seed=41)]
    weights = [0.9, -0.4]
    knots = merged_update("knots", adapters, weights, {"merge": "ta"})
    task_arithmetic = merged_update("task_arithmetic", adapters, weights)
    assert relative_error(knots, task_arithmetic) < 1e-5


def test_knots_ties_merges_the_task_coordinates_of_the_concatenated_svd():
    adapters = [factors(2, 7, 6, 2.0, seed=49), factors(2, 7, 6, 0.5, seed=50), factors(1, 7, 6, 1.0, seed=51)]
    weights = [1.0, 0.5, 2.0]
    merged = merged_update("knots", adapters, weights, {"density": 0.4})
    # Reference from a dense SVD. Its sign convention is irrelevant: flipping (u_k, row k of Vᵀ)
    # flips that row in every task, and TIES' trim, election and mean all flip along with it.
    u, s, vh = torch.linalg.svd(torch.cat([f.delta_weight().double() for f in adapters], dim=1),
                                full_matrices=False)
    u, s, vh = u[:, :5], s[:5], vh[:5]
    weighting = torch.tensor(weights, dtype=torch.float64)[:, None, None]
    # The authors' code (s_on_V=True): TIES on diag(s)·Vᵢᵀ, mapped back by U.
    scaled = (s[:, None] * vh).reshape(5, 3, 7).transpose(0, 1) * weighting
    assert relative_error(merged.double(), u @ ties_combine(scaled, 0.4, "sum")) < 1e-5
    # coordinates=unit: TIES on the unit-norm Vᵢᵀ, mapped back by UΣ; another trim, another merge
    unit = merged_update("knots", adapters, weights, {"density": 0.4, "coordinates": "unit"})
    blocks = vh.reshape(5, 3, 7).transpose(0, 1) * weighting
    assert relative_error(unit.double(), (u * s) @ ties_combine(blocks, 0.4, "sum")) < 1e-5
    assert relative_error(unit, merged) > 0.05
    assert relative_error(merged, merged_update("knots", adapters, weights, {"merge": "ta"})) > 0.05
    # Without a trim the row scale changes neither the elected signs nor the disjoint mean.
    whole = [merged_update("knots", adapters, weights, {"coordinates": c}) for c in ("scaled", "unit")]
    assert relative_error(*whole) < 1e-5


def test_knots_output_rank_is_at_most_the_sum_of_ranks():
    adapters = [factors(2, 9, 8, seed=42), factors(3, 9, 8, seed=43)]
    _, info = merge_modules("knots", {"m": adapters}, params={"density": 0.3})
    assert info["output_ranks"]["m"] == 5


def test_tucker_at_full_rank_is_the_weighted_sum_or_mean():
    adapters = [factors(2, 7, 6, 2.0, seed=44), factors(3, 7, 6, 0.5, seed=45), factors(1, 7, 6, 1.0, seed=46)]
    weights = [0.5, 1.5, -1.0]
    weighted_sum = sum(w * f.delta_weight() for f, w in zip(adapters, weights))
    merged, info = merge_modules("tucker", {"m": adapters}, weights)
    assert relative_error(merged["m"].delta_weight(), weighted_sum) < 1e-5
    assert info["per_module"]["m"]["tucker_relative_error"] < 1e-6
    mean = merged_update("tucker", adapters, weights, {"merge": "mean"})
    assert relative_error(mean, weighted_sum / sum(weights)) < 1e-5


def test_truncated_tucker_matches_a_dense_hosvd():
    adapters = [factors(3, 7, 6, seed=47), factors(3, 7, 6, seed=48)]
    weights = [1.0, 0.5]
    merged, info = merge_modules("tucker", {"m": adapters}, weights, {"rank_out": 2, "rank_in": 4})
    updates = [f.delta_weight().double() for f in adapters]
    u_out = torch.linalg.svd(torch.cat(updates, dim=1))[0][:, :2]
    u_in = torch.linalg.svd(torch.cat([u.T for u in updates], dim=1))[0][:, :4]
    project = lambda update: u_out @ u_out.T @ update @ u_in @ u_in.T  # noqa: E731
    expected = sum(w * project(u) for u, w in zip(updates, weights))
    assert relative_error(merged["m"].delta_weight().double(), expected) < 1e-5
    details = info["per_module"]["m"]
    assert (details["rank_out"], details["rank_in"], info["output_ranks"]["m"]) == (2, 4, 2)
    tucker_error = torch.sqrt(sum(torch.linalg.norm(u - project(u)) ** 2 for u in updates)
                              / sum(torch.linalg.norm(u) ** 2 for u in updates))
    assert details["tucker_relative_error"] == pytest.approx(float(tucker_error), rel=1e-6)
    # The row's own compression error: against the same weighted sum at full Tucker rank.
    full = sum(w * u for u, w in zip(updates, weights))
    assert info["max_relative_error"] == pytest.approx(relative_error(expected, full), rel=1e-4)
    _, lossless = merge_modules("tucker", {"m": adapters}, weights)
    assert lossless["max_relative_error"] < 1e-6
