"""The registry, parameter parsing, and merge_modules' rejection of bad input."""

from __future__ import annotations

import math

import pytest
import torch

import loracombench.merging as merging
from loracombench.merging import METHODS, MergeError, get_method, merge_modules, parse_params, register
from loracombench.merging.factors import LoraFactors

EXPECTED_METHODS = {"average", "task_arithmetic", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune",
                    "knots", "tucker", "tsv", "iso_c", "iso_cts", "core_space"}


def factors(rank: int = 2, in_features: int = 5, out_features: int = 4, scale: float = 2.0, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return LoraFactors(torch.randn(rank, in_features, generator=generator),
                       torch.randn(out_features, rank, generator=generator), scale)


def test_public_api_is_exactly_the_contract():
    assert set(merging.__all__) == {"MergeError", "Param", "MergeMethod", "METHODS", "register", "get_method",
                                    "parse_params", "merge_modules"}
    assert issubclass(MergeError, ValueError)


def test_every_method_is_registered_and_described():
    assert set(METHODS) == EXPECTED_METHODS
    for name, method in METHODS.items():
        assert method.name == name and method.reference and method.summary
        assert len({p.name for p in method.params}) == len(method.params)
        for param in method.params:
            assert param.kind in (float, int, str, bool) and isinstance(param.default, param.kind) and param.help
            assert param.check is None or param.check(param.default) is None


def test_only_factor_averaging_needs_equal_ranks_and_every_module():
    assert {n for n, m in METHODS.items() if m.needs_equal_ranks} == {"average"}
    assert {n for n, m in METHODS.items() if not m.takes_union_of_modules} == {"average"}


def test_register_rejects_a_duplicate_name():
    with pytest.raises(MergeError, match="already registered"):
        register(METHODS["average"])


def test_unknown_method_lists_the_valid_names():
    with pytest.raises(MergeError) as raised:
        get_method("mean_of_everything")
    assert all(name in str(raised.value) for name in EXPECTED_METHODS)
    with pytest.raises(MergeError, match="task_arithmetic"):
        merge_modules("nope", {"m": [factors()]})


def test_parse_params_types_cli_strings_and_fills_defaults():
    assert parse_params(METHODS["ties"], {"density": "0.5", "rank": "3", "sign_mode": "count"}) == {
        "density": 0.5, "sign_mode": "count", "lam": 1.0, "rank": 3}
    assert parse_params(METHODS["average"], {"normalize": "False"}) == {"normalize": False}
    assert parse_params(METHODS["average"], {"normalize": "yes"}) == {"normalize": True}
    assert parse_params(METHODS["dare_linear"], {"density": 1, "seed": 7.0}) == {"density": 1.0, "seed": 7, "rank": 0}
    assert parse_params(METHODS["task_arithmetic"], {}) == {"lam": 1.0}


def test_unknown_param_names_the_valid_ones():
    with pytest.raises(MergeError) as raised:
        parse_params(METHODS["ties"], {"densty": 0.5})
    message = str(raised.value)
    assert "densty" in message and all(p in message for p in ("density", "sign_mode", "lam", "rank"))


@pytest.mark.parametrize("method, raw", [
    ("ties", {"density": 0}),
    ("ties", {"density": "0"}),
    ("ties", {"density": 1.5}),
    ("ties", {"density": "nan"}),
    ("ties", {"density": "dense"}),
    ("ties", {"density": True}),
    ("ties", {"rank": -1}),
    ("svd", {"rank": "1.5"}),
    ("svd", {"rank": 2.5}),
    ("ties", {"lam": "inf"}),
    ("ties", {"lam": math.nan}),
    ("ties", {"sign_mode": "vote"}),
    ("knots", {"merge": "sum"}),
    ("tucker", {"merge": "ta"}),
    ("tucker", {"rank_in": -2}),
    ("dare_ties", {"seed": -1}),
    ("core_space", {"merge": "dare"}),
    ("core_space", {"density": 0}),
    ("tsv", {"fraction": 0}),
    ("tsv", {"fraction": 1.5}),
    ("iso_c", {"lam": "inf"}),
    ("iso_cts", {"common_fraction": -0.1}),
    ("iso_cts", {"common_fraction": 1.5}),
    ("average", {"normalize": "maybe"}),
    ("average", {"normalize": 1}),
])
def test_invalid_param_values_are_rejected_with_the_valid_params(method, raw):
    with pytest.raises(MergeError, match="valid parameters"):
        parse_params(METHODS[method], raw)
    with pytest.raises(MergeError):
        merge_modules(method, {"m": [factors(), factors(seed=1)]}, params=raw)


@pytest.mark.parametrize("raw, kind", [({"rank": "1.5"}, "an integer"), ({"density": "dense"}, "a number")])
def test_a_value_of_the_wrong_kind_names_the_kind_in_words(raw, kind):
    with pytest.raises(MergeError, match=f"must be {kind}"):
        parse_params(METHODS["svd" if "rank" in raw else "ties"], raw)


def with_value(tensor: torch.Tensor, value: float) -> torch.Tensor:
    changed = tensor.clone()
    changed[0, 0] = value
    return changed


@pytest.mark.parametrize("broken", [
    LoraFactors(with_value(factors().lora_A, math.nan), factors().lora_B, 2.0),
    LoraFactors(factors().lora_A, with_value(factors().lora_B, math.inf), 2.0),
    LoraFactors(factors().lora_A, with_value(factors().lora_B, -math.inf), 2.0),
    LoraFactors(factors().lora_A, factors().lora_B, math.nan),
], ids=["nan-in-A", "inf-in-B", "minus-inf-in-B", "nan-scale"])
@pytest.mark.parametrize("method", sorted(EXPECTED_METHODS))
def test_non_finite_factors_are_rejected(method, broken):
    with pytest.raises(MergeError, match="NaN or Inf"):
        merge_modules(method, {"m": [factors(seed=3), broken]})


def test_empty_inputs_are_rejected():
    with pytest.raises(MergeError, match="empty"):
        merge_modules("task_arithmetic", {"m": []})
    with pytest.raises(MergeError, match="no modules"):
        merge_modules("task_arithmetic", {})
    with pytest.raises(MergeError, match="no factors"):
        merge_modules("task_arithmetic", {"m": [None, None]})


def test_wrong_weights_are_rejected():
    modules = {"m": [factors(), factors(seed=1)]}
    with pytest.raises(MergeError, match="3 weights for 2 adapters"):
        merge_modules("task_arithmetic", modules, [1.0, 1.0, 1.0])
    with pytest.raises(MergeError, match="finite"):
        merge_modules("task_arithmetic", modules, [1.0, math.nan])


def test_modules_listing_different_adapter_counts_are_rejected():
    with pytest.raises(MergeError, match="numbers of adapters"):
        merge_modules("task_arithmetic", {"q": [factors(), factors(seed=1)], "v": [factors()]})


@pytest.mark.parametrize("other", [
    factors(in_features=6, seed=1),
    factors(out_features=3, seed=1),
], ids=["in-features", "out-features"])
@pytest.mark.parametrize("method", sorted(EXPECTED_METHODS))
def test_shape_mismatch_across_adapters_is_rejected(method, other):
    with pytest.raises(MergeError, match="disagree"):
        merge_modules(method, {"m": [factors(), other]})


def test_inconsistent_factor_shapes_are_rejected():
    broken = LoraFactors(torch.randn(3, 5), torch.randn(4, 2), 1.0)
    empty = LoraFactors(torch.zeros(0, 5), torch.zeros(4, 0), 1.0)
    for bad in (broken, empty):
        with pytest.raises(MergeError, match=r"\(r, in\) and \(out, r\)"):
            merge_modules("task_arithmetic", {"m": [bad]})
    with pytest.raises(MergeError, match="LoraFactors"):
        merge_modules("task_arithmetic", {"m": [(torch.randn(2, 5), torch.randn(4, 2))]})


def test_different_ranks_are_rejected_by_average_only():
    modules = {"m": [factors(rank=2), factors(rank=3, seed=1)]}
    with pytest.raises(MergeError, match="equal ranks"):
        merge_modules("average", modules)
    merged, _ = merge_modules("task_arithmetic", modules)
    assert merged["m"].rank == 5


def test_missing_module_is_rejected_by_average_but_not_by_union_methods():
    modules = {"q": [factors(), factors(seed=1)], "v": [factors(seed=2), None]}
    with pytest.raises(MergeError, match="missing from adapter"):
        merge_modules("average", modules)
    merged, _ = merge_modules("task_arithmetic", modules)
    torch.testing.assert_close(merged["v"].delta_weight(), factors(seed=2).delta_weight())


def test_low_precision_inputs_give_float32_outputs():
    half = LoraFactors(factors().lora_A.bfloat16(), factors().lora_B.bfloat16(), 2.0)
    merged, _ = merge_modules("svd", {"m": [half]})
    assert merged["m"].lora_A.dtype == torch.float32
    exact = 2.0 * half.lora_B.double() @ half.lora_A.double()
    torch.testing.assert_close(merged["m"].delta_weight().double(), exact, atol=1e-5, rtol=1e-5)


def test_info_reports_resolved_params_weights_and_ranks():
    merged, info = merge_modules("ties", {"q": [factors(), factors(seed=1)], "v": [factors(seed=2), factors(seed=3)]},
                                 [0.5, 2.0], {"density": "0.4"})
    assert info["method"] == "ties"
    assert info["params"] == {"density": 0.4, "sign_mode": "sum", "lam": 1.0, "rank": 0}
    assert info["weights"] == [0.5, 2.0]
    assert info["output_ranks"] == {"q": 4, "v": 4} == {name: f.rank for name, f in merged.items()}
    assert set(info["per_module"]) == {"q", "v"}
