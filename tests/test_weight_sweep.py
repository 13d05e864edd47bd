"""Weight sweeps (compose/weight_sweep.py): the Pareto front's laws, the selection rule, the grid,
bad parameters, and sweeps on a tiny base whose end points are the base and the experts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_lorahub import VALIDATION, logits

from loracombench import adapters
from loracombench.compose import BuildInputs, OneModel, get_composition
from loracombench.config import TrainSettings
from loracombench.compose.weight_sweep import (DEFAULT_GRIDS, DIRECT, PLOT_FILE, SWEEP_FILE, FoldedWeights, WeightSweepError,
                                               choose, grid_points, grid_rank, merged_factors, pareto_front,
                                               plot_pareto, reference_role, score_composed, score_model,
                                               tasks_with_retention)
from loracombench.evaluation import SCORERS, EvalConfig, evaluate_composed
from loracombench.models import load_model
from loracombench.tasks import get_task
from loracombench.training import train_adapter

# ---------------------------------------------------------------- the Pareto front


def dominates(a, b, higher_is_better) -> bool:
    oriented = [(x, y) if up else (-x, -y) for x, y, up in zip(a, b, higher_is_better)]
    return all(x >= y for x, y in oriented) and any(x > y for x, y in oriented)


def test_dominated_points_are_excluded_and_the_rest_kept():
    points = [(1, 1), (2, 2), (0, 3), (2, 1)]
    assert pareto_front(points, [True, True]) == [1, 2]


def test_equal_points_stay_together_but_a_tie_on_one_axis_is_no_shelter():
    assert pareto_front([(1, 1), (1, 1)], [True, True]) == [0, 1]
    assert pareto_front([(1, 1), (1, 2)], [True, True]) == [1]


def test_mixed_directions_count_lower_as_better_where_asked():
    # accuracy up, NLL down: (0.9, 2.0) beats (0.9, 2.5); (0.8, 1.5) beats (0.7, 1.6)
    points = [(0.9, 2.0), (0.8, 1.5), (0.7, 1.6), (0.9, 2.5)]
    assert pareto_front(points, [True, False]) == [0, 1]
    assert pareto_front(points, [True, True]) == [3]


def test_a_nan_coordinate_is_the_worst_value():
    assert pareto_front([(1.0, float("nan")), (0.5, 3.0)], [True, False]) == [0, 1]
    assert pareto_front([(0.5, float("nan")), (0.5, 3.0)], [True, False]) == [1]


def test_on_random_points_the_front_is_exactly_the_undominated_points():
    rng = np.random.default_rng(0)
    for directions in ([True, True], [True, False], [False, True, True]):
        points = rng.integers(0, 6, (40, len(directions))).tolist()  # small integers: many ties
        front = set(pareto_front(points, directions))
        for i, p in enumerate(points):
            dominated = any(dominates(q, p, directions) for q in points)
            assert (i in front) == (not dominated)


def test_the_front_refuses_points_of_the_wrong_arity():
    assert pareto_front([], [True]) == []
    with pytest.raises(ValueError, match="point 1 has 3 coordinates, higher_is_better has 2"):
        pareto_front([(1, 2), (1, 2, 3)], [True, False])


# ---------------------------------------------------------------- the selection rule

REFERENCES = {"base": {"ag_news": 0.25, "gsm8k": 2.0},
              "experts": {"ag_news": {"ag_news": 0.75, "gsm8k": 2.2}, "gsm8k": {"ag_news": 0.2, "gsm8k": 1.0}}}
TASKS = ["ag_news", "gsm8k"]
# retentions: (1, 0), (0.5, 0.5), (0.9, 0.3), (0.5, 0.5)
POINTS = [{"ag_news": 0.75, "gsm8k": 2.0}, {"ag_news": 0.5, "gsm8k": 1.5},
          {"ag_news": 0.7, "gsm8k": 1.7}, {"ag_news": 0.5, "gsm8k": 1.5}]


def test_the_chosen_point_maximises_the_stated_objective():
    chosen, scores = choose(POINTS, REFERENCES, TASKS, "mean_retention")
    assert scores == pytest.approx([0.5, 0.5, 0.6, 0.5])
    assert chosen == 2
    chosen, scores = choose(POINTS, REFERENCES, TASKS, "min_retention")
    assert scores == pytest.approx([0.0, 0.5, 0.3, 0.5])
    assert chosen == 1  # the first of two equal best points


def test_a_lower_nll_is_a_higher_retention_and_a_diverged_point_is_never_chosen():
    worse, better = {"ag_news": 0.25, "gsm8k": 2.5}, {"ag_news": 0.25, "gsm8k": 0.5}
    _, scores = choose([worse, better], REFERENCES, ["gsm8k"], "mean_retention")
    assert scores == pytest.approx([-0.5, 1.5])
    chosen, scores = choose([{"ag_news": 0.25, "gsm8k": float("nan")}, worse], REFERENCES, TASKS, "mean_retention")
    assert chosen == 1 and scores[0] == -math.inf


def test_a_task_whose_expert_is_worse_than_the_base_is_left_out_of_the_objective():
    """Its "retention" would rank the points that lose most on it as keeping most."""
    weak = {"base": REFERENCES["base"], "experts": {**REFERENCES["experts"], "gsm8k": {"ag_news": 0.2, "gsm8k": 2.4}}}
    assert tasks_with_retention(weak, TASKS) == ["ag_news"]
    assert tasks_with_retention(REFERENCES, TASKS) == TASKS
    _, scores = choose(POINTS, weak, ["ag_news"], "mean_retention")
    assert scores == pytest.approx([1.0, 0.5, 0.9, 0.5])


def test_grid_rank_counts_the_points_at_least_as_good():
    sweep = {"references": REFERENCES, "tasks_in_objective": TASKS, "selection": "mean_retention",
             "points": [{"objective": s} for s in (0.5, 0.5, 0.6, 0.5, None)]}
    assert grid_rank(sweep, POINTS[2]) == pytest.approx(1 / 5)  # as good as the best point
    assert grid_rank(sweep, POINTS[1]) == pytest.approx(4 / 5)
    assert grid_rank(sweep, {"ag_news": 0.8, "gsm8k": 0.9}) == 0.0  # better than every point


# ---------------------------------------------------------------- the grid

def test_the_grid_is_the_product_of_its_axes_in_a_fixed_order():
    points = grid_points({"weights": [0.0, 1.0], "lam": [1.0, 2.0]}, {"sign_mode": "count"}, 2)
    assert [(p["weights"], p["params"]["lam"]) for p in points] == [
        ([0.0, 0.0], 1.0), ([0.0, 0.0], 2.0), ([0.0, 1.0], 1.0), ([0.0, 1.0], 2.0),
        ([1.0, 0.0], 1.0), ([1.0, 0.0], 2.0), ([1.0, 1.0], 1.0), ([1.0, 1.0], 2.0)]
    assert all(p["params"]["sign_mode"] == "count" for p in points)
    assert [p["weights"] for p in grid_points({"scale": [0.5, 2.0]}, {}, 3)] == [[0.5] * 3, [2.0] * 3]
    assert [p["weights"] for p in grid_points({"weights": [[0.0], [1.0, 2.0]]}, {}, 2)] == [[0.0, 1.0], [0.0, 2.0]]


def test_task_arithmetic_corner_points_are_the_base_and_the_experts():
    roles = [reference_role("task_arithmetic", p)
             for p in grid_points({"weights": [0.0, 0.5, 1.0]}, {}, 2)]
    assert roles == ["base", None, 1, None, None, None, 0, None, None]
    assert reference_role("task_arithmetic", {"weights": [2.0, 0.0], "params": {"lam": 0.5}}) == 0
    assert reference_role("ties", {"weights": [1.0, 0.0], "params": {}}) is None


@pytest.mark.parametrize("params, message", [
    ({}, r"needs `method`, the merge to sweep; methods with a default grid: task_arithmetic, ties"),
    ({"method": "slerp"}, r"unknown merge method 'slerp'; valid methods: average, "),
    ({"method": "svd"}, r"no default grid for merge method 'svd' .* give at least one axis as a list: weights, scale, rank"),
    ({"method": "task_arithmetic", "weights": []}, r"grid axis 'weights' is empty or not a list, got \[\]"),
    ({"method": "ties", "density": [0.5, 1.5]}, r"grid axis 'density': ties: invalid value 1.5 for parameter 'density'"),
    ({"method": "ties", "lam": "high"}, r"invalid value 'high' for parameter 'lam'"),
    ({"method": "dare_ties", "weights": [1.0], "scale": [1.0]}, r"give `weights` .* or `scale` .*, not both"),
    ({"method": "dare_linear", "lam": [1.0]}, r"unknown parameter\(s\) \['lam'\] for method 'dare_linear'; valid: "),
    ({"method": "task_arithmetic", "weights": [0.0, math.inf]}, r"grid axis 'weights' needs finite numbers"),
    ({"method": "task_arithmetic", "selection": "best"}, r"unknown selection 'best'; valid: mean_retention, min_retention"),
    ({"method": "task_arithmetic", "n_validation": 0}, r"n_validation must be an integer >= 1"),
])
def test_bad_parameters_give_one_clear_error(params, message):
    with pytest.raises(WeightSweepError, match=message):
        get_composition("weight_sweep", params)


def test_defaults_need_validation_rows_and_forward_passes():
    sweep = get_composition("weight_sweep", {"method": "ties", "density": 0.3})
    assert sweep.params["axes"] == {"lam": DEFAULT_GRIDS["ties"]["lam"]}  # a fixed parameter is no axis
    needs = get_composition("weight_sweep", {"method": "task_arithmetic", "n_validation": 7}).needs()
    assert (needs.validation_per_task, needs.base_forward, needs.gradients) == (7, True, False)
    assert get_composition("weight_sweep", {"method": "task_arithmetic"}).needs().validation_per_task == 50


# ---------------------------------------------------------------- on a tiny base model

# Enough training on the validation rows themselves that each expert moves its own task's metric
# off the base there (AG News accuracy 0.25 -> 0.75, GSM8K gold NLL down), so both tasks have a
# retention and enter the objective.
TRAINING = {"ag_news": TrainSettings(epochs=10, batch_size=4, max_length=64, learning_rate=2e-2, checkpoint_every=0),
            "gsm8k": TrainSettings(epochs=3, batch_size=4, max_length=64, learning_rate=5e-2, checkpoint_every=0)}


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    for task, settings in TRAINING.items():
        train_adapter(load_model("tiny-llama"), get_task(task), VALIDATION[task], settings, root / task, progress=False)
    return {task: root / task for task in TRAINING}


@pytest.fixture(scope="module")
def shared():
    return adapters.SharedBase(load_model("tiny-llama"))


def build(out, experts, shared, **params):
    composition = get_composition("weight_sweep", params)
    out.mkdir(parents=True)
    inputs = BuildInputs(experts=experts, seed=0, borrow_base=shared.borrowed,
                         validation={task: rows[: composition.needs().validation_per_task]
                                     for task, rows in VALIDATION.items()})
    return composition, composition.build(inputs, out)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, experts, shared):
    """Task arithmetic over (w₁, w₂) ∈ {0, 0.5, 1}², with the base's logits before the build."""
    before = logits(shared.loaded.model)
    out = tmp_path_factory.mktemp("sweep") / "built"
    composition, metadata = build(out, experts, shared, method="task_arithmetic", weights=[0.0, 0.5, 1.0])
    return composition, out, metadata, before


def predictions_of(model, tokenizer):
    by_task = {}
    for name, rows in VALIDATION.items():
        task = get_task(name)
        predict, _ = SCORERS[task.kind]
        by_task[name] = predict(model, tokenizer, task, rows, range(len(rows)), EvalConfig(n_generate=0), False)
    return by_task


def assert_same_predictions(first: dict, second: dict, exact: bool):
    for task in first:
        for a, b in zip(first[task], second[task]):
            assert a.get("prediction") == b.get("prediction")
            tolerance = 0 if exact else 2e-4  # the 4th decimal may round the other way
            assert a.get("logprobs", [0]) == pytest.approx(b.get("logprobs", [0]), abs=tolerance, rel=0)
            assert a.get("gold_nll", 0) == pytest.approx(b.get("gold_nll", 0), abs=tolerance, rel=0)


def test_the_task_arithmetic_end_points_are_the_base_and_the_experts(experts, shared):
    """Folding the merge at (0, 0) scores as the base, bit for bit; at (1, 0) and (0, 1) as each
    expert folded in by PEFT, up to the rounding of one matmul over the concatenated factors."""
    read = [adapters.read_adapter(path) for path in experts.values()]
    modules = {name: [e.factors.get(name) for e in read] for name in read[0].factors}
    tokenizer = shared.loaded.tokenizer
    with shared.with_adapter(None) as base:
        base_predictions = predictions_of(base, tokenizer)
    for weights, reference in (([1.0, 0.0], experts["ag_news"]), ([0.0, 1.0], experts["gsm8k"]), ([0.0, 0.0], None)):
        with shared.with_adapter(reference) as model:
            expected = predictions_of(model, tokenizer)
        with shared.borrowed() as loaded:
            folded = FoldedWeights(loaded.model, sorted(modules))
            folded.fold(merged_factors("task_arithmetic", modules, {"weights": weights, "params": {}}))
            got = predictions_of(loaded.model, tokenizer)
        assert_same_predictions(got, expected, exact=reference is None)
        if reference is not None:  # the expert does change the predictions
            assert any(a["logprobs"] != b["logprobs"] for a, b in zip(expected["ag_news"], base_predictions["ag_news"]))


def test_sweep_records_every_point_its_front_and_the_objective_it_maximised(swept):
    composition, out, metadata, _ = swept
    sweep = json.loads((out / SWEEP_FILE).read_text())
    points = sweep["points"]
    assert len(points) == metadata["points"] == 9
    # the corners of the grid are the references, not scored again
    assert sweep["references"]["sources"] == {"base": "grid point 0", "ag_news": "grid point 6",
                                              "gsm8k": "grid point 2"}
    assert metadata["references_scored"] == 0
    assert sweep["references"]["experts"]["ag_news"] == points[6]["metrics"]
    assert sweep["tasks_in_objective"] == ["ag_news", "gsm8k"]
    assert points[6]["retention"]["ag_news"] == 1.0 and points[0]["retention"]["gsm8k"] == 0.0
    objectives = [p["objective"] for p in points]
    assert sweep["chosen"] == objectives.index(max(objectives))
    assert [p["chosen"] for p in points] == [i == sweep["chosen"] for i in range(9)]
    directions = [sweep["metrics"][t]["higher_is_better"] for t in sweep["tasks"]]
    assert directions == [True, False]  # AG News accuracy up, GSM8K gold NLL down
    front = pareto_front([[p["metrics"][t] for t in sweep["tasks"]] for p in points], directions)
    assert [p["pareto"] for p in points] == [i in front for i in range(9)]
    assert metadata["validation_examples"] == {"ag_news": 12, "gsm8k": 3}
    assert metadata["seconds"] >= metadata["score_s"] > 0
    assert (out / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_chosen_adapter_scores_as_the_sweep_measured_and_the_base_is_unchanged(swept, shared):
    composition, out, _, before = swept
    sweep = json.loads((out / SWEEP_FILE).read_text())
    torch.testing.assert_close(logits(shared.loaded.model), before, rtol=0, atol=0)
    assert not hasattr(shared.loaded.model, "peft_config")
    composed = composition.load(out)
    assert isinstance(composed, OneModel)
    measured = score_composed(composed, shared, out)
    assert measured == sweep["points"][sweep["chosen"]]["metrics"]
    assert grid_rank(sweep, measured) == sum(p["objective"] == max(q["objective"] for q in sweep["points"])
                                             for p in sweep["points"]) / len(sweep["points"])
    record = evaluate_composed(composed, shared, get_task("ag_news"), VALIDATION["ag_news"],
                               EvalConfig(n_eval=None, n_generate=0), {"label": "weight_sweep"}, progress=False)
    assert record["metrics"]["accuracy"]["value"] == measured["ag_news"]
    torch.testing.assert_close(logits(shared.loaded.model), before, rtol=0, atol=0)


def test_other_models_are_placed_on_the_same_rows_and_plot(swept, shared, experts, tmp_path):
    _, out, _, _ = swept
    sweep = json.loads((out / SWEEP_FILE).read_text())
    expert = score_composed(OneModel(experts["gsm8k"]), shared, out, label="gsm8k expert")
    assert expert["gsm8k"] == pytest.approx(sweep["references"]["experts"]["gsm8k"]["gsm8k"], abs=2e-4)
    path = plot_pareto(out, tmp_path / "with_others.png", others={"gsm8k expert (re-scored)": expert})
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_the_same_inputs_give_the_same_choice(swept, experts, shared, tmp_path):
    _, out, _, _ = swept
    _, again = build(tmp_path / "again", experts, shared, method="task_arithmetic", weights=[0.0, 0.5, 1.0])
    first, second = (json.loads((folder / SWEEP_FILE).read_text()) for folder in (out, tmp_path / "again"))
    assert second["points"] == first["points"] and second["chosen"] == first["chosen"]
    # Byte for byte: sweep.json decides the placements' cache keys, so it holds no timings.
    assert (tmp_path / "again" / SWEEP_FILE).read_bytes() == (out / SWEEP_FILE).read_bytes()


def test_ties_scores_the_base_and_experts_directly_as_peft_folds_them(experts, shared, tmp_path):
    _, metadata = build(tmp_path / "ties", experts, shared, method="ties", density=[0.5, 1.0], lam=[1.0])
    sweep = json.loads((tmp_path / "ties" / SWEEP_FILE).read_text())
    assert metadata["points"] == 2 and metadata["references_scored"] == 3
    assert set(sweep["references"]["sources"].values()) == {DIRECT}
    assert score_composed(OneModel(experts["ag_news"]), shared, tmp_path / "ties") == \
        sweep["references"]["experts"]["ag_news"]
    with shared.with_adapter(None) as base:
        assert score_model(base, shared.loaded.tokenizer, VALIDATION, "auto") == sweep["references"]["base"]


def test_wrong_arity_or_missing_rows_fail_before_the_base_is_borrowed(experts, tmp_path):
    sweep = get_composition("weight_sweep", {"method": "task_arithmetic", "weights": [[0.0, 1.0]] * 3})
    with pytest.raises(WeightSweepError, match="weights gives 3 lists of values for 2 experts"):
        sweep.build(BuildInputs(experts=experts, seed=0, validation=VALIDATION), tmp_path)
    sweep = get_composition("weight_sweep", {"method": "task_arithmetic"})
    with pytest.raises(WeightSweepError, match="none for gsm8k"):
        sweep.build(BuildInputs(experts=experts, seed=0, validation={"ag_news": VALIDATION["ag_news"]}), tmp_path)
    with pytest.raises(WeightSweepError, match="borrow_base is None"):
        sweep.build(BuildInputs(experts=experts, seed=0, validation=VALIDATION), tmp_path)


def test_a_run_builds_the_sweep_from_its_validation_rows_and_evaluates_the_choice(tmp_path, small_mirror):
    import yaml
    from test_pipeline_and_cli import SMOKE

    from loracombench.cli import main

    sweep = {"method": "weight_sweep", "label": "ta_sweep",
             "params": {"method": "task_arithmetic", "weights": [0.0, 1.0], "n_validation": 2}}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**SMOKE, "merges": [], "compositions": [sweep],
                                      "eval": {**SMOKE["eval"], "n_generate": 0}}))
    out = tmp_path / "run"
    assert main(["run", "--config", str(config), "--data-dir", str(small_mirror), "--out", str(out)]) == 0
    built = out / "compositions" / "seed0" / "ta_sweep"
    recorded = json.loads((built / SWEEP_FILE).read_text())
    # the small mirror holds 2 GSM8K train rows outside the training sample: 2 per task is what it has
    assert len(recorded["points"]) == 4 and recorded["n_validation"] == {"ag_news": 2, "gsm8k": 2}
    composition = json.loads((built / "composition.json").read_text())
    assert composition["needs_summary"] == "2 val/task, forward passes"
    for task in ("ag_news", "gsm8k"):
        assert (out / "eval" / "compose_ta_sweep_seed0" / task / "metrics.json").is_file()
