"""Compositions in the pipeline: each is one config entry, built once, cached, evaluated and
reported beside the static merges with what it needs."""

from __future__ import annotations

import csv

import yaml

from loracombench import io
from loracombench.cli import main

SMOKE = {
    "name": "t", "model": "tiny-llama", "n_train": {"ag_news": 8, "gsm8k": 4},
    "train": {"epochs": 1, "batch_size": 4, "max_length": 64},
    "eval": {"n_eval": {"ag_news": 8, "gsm8k": 3}, "n_generate": 0, "max_new_tokens": 4},
}
COMPOSITIONS = [{"method": "route_oracle"}, {"method": "route_classifier"}, {"method": "route_arrow_sequence"},
                {"method": "lorahub", "params": {"budget": 4, "n_validation": 2}},
                {"method": "multitask"}]


def test_routers_searches_and_multitask_run_beside_the_merges_with_their_needs(tmp_path, small_mirror, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**SMOKE, "baselines": False, "merges": [{"method": "average"}],
                                      "compositions": COMPOSITIONS}))
    out = tmp_path / "run"
    argv = ["run", "--config", str(config), "--data-dir", str(small_mirror), "--out", str(out)]
    assert main(argv) == 0
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    scores = {(r["model"], r["task"], r["metric"]): float(r["value"]) for r in rows if r["statistic"] == "score"}
    labels = {model for model, _, _ in scores}
    assert {"route_oracle", "route_classifier", "lorahub_budget4_n_validation2", "multitask"} <= labels
    for task, metric in (("ag_news", "accuracy"), ("gsm8k", "gold_nll")):
        assert scores[("route_oracle", task, metric)] == scores[(f"{task} expert", task, metric)]
    # The oracle retains exactly all of each expert wherever the expert moved the score.
    retention = [r for r in rows if r["statistic"] == "retention" and r["model"] == "route_oracle"]
    assert retention and all(float(r["value"]) == 1.0 for r in retention if r["value"])
    record = io.read_json(out / "eval" / "compose_route_classifier_seed0" / "ag_news" / "metrics.json")
    assert record["model"]["needs"] == "training prompts" and "routing_accuracy" in record["metrics"]
    record = io.read_json(out / "eval" / "compose_route_arrow_sequence_seed0" / "gsm8k" / "metrics.json")
    assert record["model"]["needs"] == "a base pass per prompt" and "routing_accuracy" in record["metrics"]
    record = io.read_json(out / "eval" / "compose_multitask_seed0" / "ag_news" / "metrics.json")
    assert record["model"]["needs"] == "training data, gradients"  # its training rows, targets and all
    report = (out / "results.md").read_text()
    assert "task label at test" in report and "val/task" in report
    capsys.readouterr()

    assert main(argv) == 0  # a rerun reuses every composition
    log = capsys.readouterr().out
    for name in ("route_oracle", "route_classifier", "route_arrow_sequence", "lorahub_budget4_n_validation2",
                 "multitask"):
        assert f"compose {name} (seed 0): cached" in log
    assert not list((out / "compositions" / "seed0").glob("*.scratch"))


def test_a_sweep_without_n_validation_says_it_scores_fewer_rows_of_a_generation_task():
    from loracombench.compose import get_composition

    sweep = get_composition("weight_sweep", {"method": "task_arithmetic"})
    assert sweep.needs().summary() == "50 val/task (20 for generation tasks), forward passes"
    sweep = get_composition("weight_sweep", {"method": "task_arithmetic", "n_validation": 30})
    assert sweep.needs().summary() == "30 val/task, forward passes"
