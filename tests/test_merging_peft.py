"""Cross-checks against PEFT 0.21.2's LoraModel.add_weighted_adapter on a tiny model.

What the installed PEFT (peft/tuners/lora/model.py, peft/utils/merge_utils.py) does:
- The merged adapter's config copies the first adapter's config with r = lora_alpha = new rank,
  so its scaling is 1 and ΔW_merged = B_new @ A_new. The scaling is applied once (older releases
  applied it twice in the SVD path; 0.21.2 does not: its SVD path takes get_delta_weight, which
  includes the scaling, and stores U·S and Vh with scaling 1).
- Exception, a PEFT quirk: use_rslora is copied too, and rsLoRA scales by lora_alpha / sqrt(r),
  so a merge whose first adapter uses rsLoRA gets scaling sqrt(new rank) instead of 1 and its ΔW
  is sqrt(new rank) times the intended one (test_peft_rslora_merge_is_off_by_sqrt_of_rank).
- "cat": A_new = cat(wᵢ·scalingᵢ·Aᵢ) rows, B_new = cat(Bᵢ) columns: exact Σ wᵢΔWᵢ, like our
  task_arithmetic (which puts wᵢsᵢ on B instead; same product).
- "svd": dense Σ wᵢΔWᵢ, torch.linalg.svd, B = U_k·S_k, A = Vh_k; default rank = max input rank.
- "ties_svd": magnitude pruning keeps int(density·numel) entries per task; the sign is elected
  on the unweighted pruned tensors ("total" = sign of the sum, "frequency" = of the sign count),
  then the weights enter in the disjoint mean. Ours weights first; equal for equal weights.
- "linear" (equal ranks only) scales both Aᵢ and Bᵢ by sqrt(wᵢ·scalingᵢ) and sums the factors, so
  ΔW = (Σ√(wᵢsᵢ)Bᵢ)(Σ√(wᵢsᵢ)Aᵢ): with equal scales s and wᵢ = 1/n² it is our factor average.
- "magnitude_prune" prunes each task before summing; ours prunes the sum (not compared).
- dare_* use the global torch RNG (torch.bernoulli), so they cannot be compared entry by entry.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from loracombench.merging import merge_modules  # noqa: E402
from loracombench.merging.factors import LoraFactors  # noqa: E402

MODULES = ("query", "value")
WEIGHTS = [0.7, -0.4]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(8, 6)
        self.value = nn.Linear(8, 4)

    def forward(self, x):
        return self.query(x), self.value(x)


def config(r: int, alpha: float, rslora: bool = False):
    return peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(MODULES), init_lora_weights=False,
                           use_rslora=rslora)


@pytest.fixture(scope="module")
def model():
    """Adapters task1 (r 4, alpha 8: scale 2), task2 (r 2, alpha 3: scale 1.5), task3 (r 4, alpha 8)."""
    torch.manual_seed(0)
    wrapped = peft.get_peft_model(Tiny(), config(4, 8), adapter_name="task1")
    wrapped.add_adapter("task2", config(2, 3))
    wrapped.add_adapter("task3", config(4, 8))
    return wrapped


def layer(model, module: str):
    return getattr(model.base_model.model, module)


def our_factors(model, adapters: list[str]) -> dict[str, list[LoraFactors]]:
    return {
        module: [LoraFactors(layer(model, module).lora_A[name].weight.detach().clone(),
                             layer(model, module).lora_B[name].weight.detach().clone(),
                             layer(model, module).scaling[name]) for name in adapters]
        for module in MODULES
    }


def peft_delta(model, module: str, adapter: str) -> torch.Tensor:
    return layer(model, module).get_delta_weight(adapter).detach()


def peft_merge(model, name: str, adapters: list[str], weights: list[float], **kwargs) -> str:
    model.add_weighted_adapter(adapters, weights, name, **kwargs)
    return name


def test_extracted_factors_reproduce_peft_updates(model):
    for module, factors in our_factors(model, ["task1", "task2"]).items():
        for adapter, ours in zip(["task1", "task2"], factors):
            torch.testing.assert_close(ours.delta_weight(), peft_delta(model, module, adapter))
    assert layer(model, "query").scaling["task1"] == 2.0 and layer(model, "query").scaling["task2"] == 1.5


def test_cat_equals_task_arithmetic(model):
    name = peft_merge(model, "merged_cat", ["task1", "task2"], WEIGHTS, combination_type="cat")
    merged, info = merge_modules("task_arithmetic", our_factors(model, ["task1", "task2"]), WEIGHTS)
    for module in MODULES:
        torch.testing.assert_close(merged[module].delta_weight(), peft_delta(model, module, name), atol=1e-6, rtol=0)
        assert info["output_ranks"][module] == layer(model, module).lora_A[name].weight.shape[0] == 6


def test_svd_equals_our_svd_at_the_same_rank(model):
    name = peft_merge(model, "merged_svd", ["task1", "task2"], WEIGHTS, combination_type="svd", svd_rank=3)
    merged, _ = merge_modules("svd", our_factors(model, ["task1", "task2"]), WEIGHTS, {"rank": 3})
    for module in MODULES:
        assert layer(model, module).scaling[name] == 1.0
        torch.testing.assert_close(merged[module].delta_weight(), peft_delta(model, module, name), atol=1e-5, rtol=0)


@pytest.mark.parametrize("peft_sign, our_sign", [("total", "sum"), ("frequency", "count")])
def test_ties_svd_equals_our_ties_for_equal_weights(model, peft_sign, our_sign):
    # density 0.25 keeps exactly 12 of 48 (query) and 8 of 32 (value) entries in both libraries.
    name = peft_merge(model, f"merged_ties_{peft_sign}", ["task1", "task2", "task3"], [0.6, 0.6, 0.6],
                      combination_type="ties_svd", svd_rank=4, density=0.25, majority_sign_method=peft_sign)
    merged, _ = merge_modules("ties", our_factors(model, ["task1", "task2", "task3"]), [0.6, 0.6, 0.6],
                              {"density": 0.25, "rank": 4, "sign_mode": our_sign})
    for module in MODULES:
        torch.testing.assert_close(merged[module].delta_weight(), peft_delta(model, module, name), atol=1e-5, rtol=0)


def test_linear_at_inverse_square_weights_equals_factor_averaging(model):
    name = peft_merge(model, "merged_linear", ["task1", "task3"], [0.25, 0.25], combination_type="linear")
    merged, _ = merge_modules("average", our_factors(model, ["task1", "task3"]))
    for module in MODULES:
        torch.testing.assert_close(merged[module].delta_weight(), peft_delta(model, module, name), atol=1e-6, rtol=0)


def test_peft_rslora_merge_is_off_by_sqrt_of_rank():
    torch.manual_seed(1)
    wrapped = peft.get_peft_model(Tiny(), config(4, 8, rslora=True), adapter_name="task1")
    wrapped.add_adapter("task2", config(2, 3))
    name = peft_merge(wrapped, "merged_cat", ["task1", "task2"], WEIGHTS, combination_type="cat")
    merged, _ = merge_modules("task_arithmetic", our_factors(wrapped, ["task1", "task2"]), WEIGHTS)
    for module in MODULES:
        assert layer(wrapped, module).scaling["task1"] == 8 / math.sqrt(4)
        torch.testing.assert_close(peft_delta(wrapped, module, name), math.sqrt(6) * merged[module].delta_weight(),
                                   atol=1e-5, rtol=1e-5)
