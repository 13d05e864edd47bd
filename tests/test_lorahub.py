"""LoraHub (compose/lorahub.py): the combination laws, the search on a known optimum, determinism,
bad parameters, and a build scored by the evaluator on one shared tiny base left as it was."""

from __future__ import annotations

import json
import math

import pytest
import torch

from loracombench import adapters
from loracombench.compose import BuildInputs, OneModel, get_composition
from loracombench.compose.lorahub import (TRAJECTORY_FILE, LoraHubError, ValidationLoss, combine_exact,
                                          combine_faithful, combine_modules, l1_penalty, search_weights)
from loracombench.config import TrainSettings
from loracombench.evaluation import EvalConfig, evaluate_composed, model_device
from loracombench.merging.factors import LoraFactors
from loracombench.models import load_model
from loracombench.tasks import get_task
from loracombench.training import lora_config

VALIDATION = {
    "ag_news": [{"text": f"{word} report {i}", "label": label} for i in range(3)
                for label, word in enumerate(["election", "match", "stocks", "chip"])],
    "gsm8k": [{"question": f"Ann has {a} pens and gets {b} more. How many pens?",
               "answer": f"She has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} pens.\n#### {a + b}"}
              for a, b in [(1, 2), (3, 4), (5, 6)]],
}


def random_factors(generator, rank: int, scale: float) -> LoraFactors:
    return LoraFactors(torch.randn(rank, 7, generator=generator, dtype=torch.float64),
                       torch.randn(5, rank, generator=generator, dtype=torch.float64), scale)


def write_expert(out, task: str, rank: int = 4, seed: int = 0):
    """A tiny-llama LoRA with random nonzero factors, saved as training saves one."""
    from peft import get_peft_model

    loaded = load_model("tiny-llama")
    torch.manual_seed(seed)
    model = get_peft_model(loaded.model, lora_config(TrainSettings(r=rank, lora_alpha=2 * rank), "llama"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: an expert must change something
                p.normal_(0.0, 0.5)
    model.peft_config["default"].base_model_name_or_path = loaded.path
    adapters.save_peft_model(model, out, {"kind": "trained", "task": task, "base_model": loaded.fingerprint})
    return out


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    return {"ag_news": write_expert(root / "ag_news", "ag_news", seed=1),
            "gsm8k": write_expert(root / "gsm8k", "gsm8k", seed=2)}


@pytest.fixture
def shared():
    return adapters.SharedBase(load_model("tiny-llama"))


def build(tmp_path, experts, shared, **params):
    composition = get_composition("lorahub", params)
    out = tmp_path / "built"
    out.mkdir(parents=True)
    inputs = BuildInputs(experts=experts, seed=0, borrow_base=shared.borrowed,
                         validation={task: rows[: composition.needs().validation_per_task]
                                     for task, rows in VALIDATION.items()})
    return composition, out, composition.build(inputs, out)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[5, 17, 300, 42, 7, 99]])).logits


# ---------------------------------------------------------------- combination laws

def test_faithful_is_exact_at_squared_weights_plus_the_cross_terms():
    generator = torch.Generator().manual_seed(0)
    factors = [random_factors(generator, rank=3, scale=2.0) for _ in range(3)]
    weights = [0.7, -1.2, 0.4]
    cross = sum(2.0 * weights[i] * weights[j] * factors[i].lora_B @ factors[j].lora_A
                for i in range(3) for j in range(3) if i != j)
    faithful = combine_faithful(factors, weights).delta_weight()
    exact_at_squares = combine_exact(factors, [w * w for w in weights]).delta_weight()
    torch.testing.assert_close(faithful - exact_at_squares, cross)
    assert torch.linalg.norm(cross) > 0.1 * torch.linalg.norm(faithful)  # the law is not 0 = 0


def test_exact_is_the_weighted_sum_of_updates_for_any_ranks_and_scales():
    generator = torch.Generator().manual_seed(1)
    factors = [random_factors(generator, rank=2, scale=0.5), random_factors(generator, rank=4, scale=3.0)]
    combined = combine_exact(factors, [1.5, -0.25])
    assert combined.rank == 6
    torch.testing.assert_close(combined.delta_weight(),
                               1.5 * factors[0].delta_weight() - 0.25 * factors[1].delta_weight())


def test_faithful_refuses_unequal_ranks_or_scalings_and_names_the_module():
    generator = torch.Generator().manual_seed(2)
    for other in (random_factors(generator, rank=2, scale=1.0), random_factors(generator, rank=3, scale=2.0)):
        with pytest.raises(LoraHubError, match=r"module q_proj has ranks .* use variant='exact'"):
            combine_modules("faithful", {"q_proj": [random_factors(generator, 3, 1.0), other]}, [1.0, 1.0])


# ---------------------------------------------------------------- the search

def test_search_finds_a_planted_optimum_from_zero():
    planted = [0.7, -0.4, 1.1]

    def cross_entropy(weights):
        return sum((w - p) ** 2 for w, p in zip(weights, planted))

    search = search_weights(cross_entropy, 3, budget=40, bounds=(-1.5, 1.5), seed=0)
    assert search.candidates[0]["weights"] == [0.0, 0.0, 0.0]
    assert len(search.candidates) == 40
    assert search.best == min(search.candidates, key=lambda c: c["loss"])
    assert search.best["loss"] == pytest.approx(search.best["cross_entropy"] + l1_penalty(search.best["weights"]))
    # The L1 term moves the optimum by 0.05/(2·3) toward 0 per weight; the search finds that point.
    shifted = [p - 0.05 / 6 * (1 if p > 0 else -1) for p in planted]
    # The shift is 0.0083, so the tolerance must be well under it to tell the two optima apart.
    assert search.best["weights"] == pytest.approx(shifted, abs=0.003)
    distance = lambda point: max(abs(w - q) for w, q in zip(search.best["weights"], point))  # noqa: E731
    assert distance(shifted) < distance(planted)


def test_a_diverged_candidate_is_never_the_best():
    def cross_entropy(weights):
        return math.nan if weights[0] > 0.5 else (weights[0] - 1.2) ** 2

    search = search_weights(cross_entropy, 1, budget=20, bounds=(-1.5, 1.5), seed=0)
    assert any(math.isnan(c["cross_entropy"]) for c in search.candidates)
    assert search.best["weights"][0] <= 0.5 and math.isfinite(search.best["loss"])


def test_search_stays_within_the_bounds():
    search = search_weights(lambda w: sum((x - 3.0) ** 2 for x in w), 2, budget=20, bounds=(-0.5, 1.0), seed=0)
    assert all(-0.5 <= x <= 1.0 for c in search.candidates for x in c["weights"])
    assert search.best["weights"] == pytest.approx([1.0, 1.0], abs=0.02)


# ---------------------------------------------------------------- parameters

@pytest.mark.parametrize("params, message", [
    ({"variant": "soft"}, r"unknown variant 'soft'; valid: faithful, exact"),
    ({"budget": 0}, r"budget must be an integer >= 1, got 0"),
    ({"n_validation": 2.5}, r"n_validation must be an integer >= 1, got 2.5"),
    ({"seed": -1}, r"seed must be an integer from 0 to 4294967295"),
    ({"seed": 2**32}, r"seed must be an integer from 0 to 4294967295"),  # numpy's RandomState stops there
    ({"bounds": [0.5, 1.5]}, r"bounds must be \[low, high\] .* got \[0.5, 1.5\]"),
    ({"bounds": [1.0]}, r"bounds must be"),
    ({"weights": [1, 1]}, r"unknown parameter\(s\) \['weights'\]; valid: \['bounds', 'budget'"),
    ({"grid": []}, r"grid must be null or a list of distinct finite numbers .* got \[\]"),
    ({"grid": [0, 0.5, 0.5]}, r"grid must be null or a list of distinct finite numbers"),
    ({"grid": [0, float("nan")]}, r"grid must be null or a list of distinct finite numbers"),
    ({"grid": 1.0}, r"grid must be null or a list"),
])
def test_bad_parameters_give_one_clear_error(params, message):
    with pytest.raises(ValueError, match=message):
        get_composition("lorahub", params)


def test_declares_its_validation_rows_and_forward_passes():
    needs = get_composition("lorahub", {"n_validation": 3}).needs()
    assert (needs.validation_per_task, needs.base_forward, needs.gradients) == (3, True, False)


def test_unusable_experts_or_data_fail_before_the_base_is_borrowed(tmp_path, experts):
    odd_rank = write_expert(tmp_path / "odd", "gsm8k", rank=2)
    inputs = BuildInputs(experts={"ag_news": experts["ag_news"], "gsm8k": odd_rank}, seed=0, borrow_base=None,
                         validation=VALIDATION)
    with pytest.raises(LoraHubError, match="variant 'faithful' .* equal ranks"):
        get_composition("lorahub").build(inputs, tmp_path)
    inputs = BuildInputs(experts=experts, seed=0, borrow_base=None, validation={"ag_news": VALIDATION["ag_news"]})
    with pytest.raises(LoraHubError, match="none for gsm8k"):
        get_composition("lorahub").build(inputs, tmp_path)


# ---------------------------------------------------------------- on a tiny base model

def test_build_load_and_evaluate_on_the_shared_base_leave_it_unchanged(tmp_path, experts, shared):
    before = logits(shared.loaded.model)
    composition, out, metadata = build(tmp_path, experts, shared, variant="exact", budget=8, n_validation=2)
    torch.testing.assert_close(logits(shared.loaded.model), before, rtol=0, atol=0)
    assert not hasattr(shared.loaded.model, "peft_config")  # else the next adapter loaded on it warns

    trajectory = json.loads((out / TRAJECTORY_FILE).read_text())
    assert len(trajectory["candidates"]) == metadata["evaluations"] == 8
    assert list(metadata["best_weights"]) == ["ag_news", "gsm8k"]
    assert trajectory["best"]["loss"] == metadata["best_loss"] == min(c["loss"] for c in trajectory["candidates"])
    # The written adapter is the best candidate, and the evaluator's model (the adapter folded into
    # the base) has the loss the search measured in memory.
    written = adapters.read_adapter(out / "adapter")
    modules = {name: [adapters.read_adapter(p).factors[name] for p in experts.values()] for name in written.factors}
    for name, combined in combine_modules("exact", modules, list(metadata["best_weights"].values())).items():
        torch.testing.assert_close(written.factors[name].delta_weight(), combined.delta_weight())
    composed = composition.load(out)
    assert isinstance(composed, OneModel)
    with composed.open("model", shared) as model:
        loss = ValidationLoss(shared.loaded.tokenizer, {t: r[:2] for t, r in VALIDATION.items()},
                              model_device(model))
        assert loss(model) == pytest.approx(metadata["best_cross_entropy"], rel=1e-4)

    task = get_task("ag_news")
    record = evaluate_composed(composed, shared, task, VALIDATION["ag_news"], EvalConfig(n_eval=None, n_generate=0),
                               {"name": "lorahub"}, progress=False)
    assert record["n"] == len(VALIDATION["ag_news"]) and 0 <= record["metrics"]["accuracy"]["value"] <= 1
    torch.testing.assert_close(logits(shared.loaded.model), before, rtol=0, atol=0)


def test_the_same_seed_gives_the_same_weights_and_trajectory(tmp_path, experts, shared):
    runs = [build(tmp_path / f"run{i}", experts, shared, budget=6, n_validation=2, seed=3) for i in range(2)]
    trajectories = [json.loads((out / TRAJECTORY_FILE).read_text()) for _, out, _ in runs]
    assert runs[0][2]["best_weights"] == runs[1][2]["best_weights"]
    assert trajectories[0]["candidates"] == trajectories[1]["candidates"]
    assert len({json.dumps(c["weights"]) for c in trajectories[0]["candidates"]}) > 1  # it did search


def test_the_grid_is_scored_on_the_search_objective_and_ranks_the_result(tmp_path, experts, shared):
    _, out, metadata = build(tmp_path, experts, shared, variant="exact", budget=6, n_validation=2, grid=[0, 1])
    trajectory = json.loads((out / TRAJECTORY_FILE).read_text())
    grid = trajectory["grid"]
    assert [p["weights"] for p in grid] == [[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]
    # Each point's loss is the objective the search minimised, measured afresh on that combination;
    # the point (0, 0) is the search's own start, so it is among the candidates with the same loss.
    rows = {t: r[:2] for t, r in VALIDATION.items()}
    modules = {name: [adapters.read_adapter(p).factors[name] for p in experts.values()]
               for name in adapters.read_adapter(out / "adapter").factors}
    with shared.borrowed() as loaded:
        adapters.write_factors(tmp_path / "point", combine_modules("exact", modules, [1.0, 0.0]),
                               {k: v for k, v in adapters.read_adapter(experts["ag_news"]).config.items()
                                if k != "auto_mapping"}, {"kind": "test"})
        model = adapters.apply_adapter(loaded, tmp_path / "point").eval()
        try:
            measured = ValidationLoss(loaded.tokenizer, rows, model_device(model))(model)
        finally:
            model.unload()
    assert grid[2]["cross_entropy"] == pytest.approx(measured, rel=1e-5)
    assert grid[2]["loss"] == pytest.approx(measured + l1_penalty([1.0, 0.0]), rel=1e-5)
    assert grid[0]["loss"] == pytest.approx(trajectory["candidates"][0]["loss"], rel=1e-6)
    expected_rank = sum(p["loss"] <= metadata["best_loss"] for p in grid) / 4
    assert metadata["grid_rank"] == trajectory["grid_rank"] == expected_rank
    assert "grid" not in json.loads((build(tmp_path / "off", experts, shared, budget=2, n_validation=2)[1]
                                     / TRAJECTORY_FILE).read_text())


def test_the_audited_loss_batches_are_the_batches_the_search_scores(tmp_path, experts, shared, monkeypatch):
    """LoraHub.loss_batches (scripts/lost_targets.py) names the batches the objective is taken on."""
    from loracombench.compose import lorahub

    scored, collate = [], lorahub.collate
    monkeypatch.setattr(lorahub, "collate", lambda batch, *args: scored.append(batch) or collate(batch, *args))
    composition, _, _ = build(tmp_path, experts, shared, budget=2, n_validation=5)
    inputs = BuildInputs(experts=experts, seed=0, validation={t: rows[:5] for t, rows in VALIDATION.items()})
    assert scored and scored == composition.loss_batches(inputs, shared.loaded.tokenizer)
