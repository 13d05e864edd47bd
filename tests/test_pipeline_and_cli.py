"""The run pipeline (cached, resumable cells, report) and the command line."""

from __future__ import annotations

import csv

import pytest
import yaml

from loracombench.cli import build_parser, main
from loracombench.config import ExperimentConfig, load_config

SMOKE = {
    "name": "t", "model": "tiny-llama", "n_train": {"ag_news": 8, "gsm8k": 4},
    "train": {"epochs": 1, "batch_size": 4, "max_length": 64},
    "eval": {"n_eval": {"ag_news": 8, "gsm8k": 3}, "n_generate": 2, "max_new_tokens": 4},
    "merges": [{"method": "average"}], "baselines": False,
}


def write_config(tmp_path, **changes):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**SMOKE, **changes}))
    return path


def test_run_resumes_from_finished_cells_and_reports(tmp_path, small_mirror, capsys):
    out = tmp_path / "run"
    argv = ["run", "--config", str(write_config(tmp_path)), "--data-dir", str(small_mirror), "--out", str(out)]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "cached" not in first and "| merge: average |" in first
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    models = {r["model"] for r in rows}
    assert models == {"base", "ag_news expert", "gsm8k expert", "merge: average"}
    assert {r["metric"] for r in rows} >= {"accuracy", "macro_f1", "gold_nll", "exact_match_flexible"}
    scores = [r for r in rows if r["statistic"] == "score"]
    assert all(float(r["ci_low"]) <= float(r["value"]) + 1e-9 for r in scores)
    assert {r["comparator"] for r in rows if r["statistic"] == "difference"} == {"ag_news expert", "gsm8k expert"}
    assert (out / "results.png").stat().st_size > 5000
    stamp = (out / "eval" / "merge_average_seed0" / "ag_news" / "metrics.json").stat().st_mtime_ns

    # Interrupted run: one result is missing. The rerun recomputes that cell alone.
    (out / "eval" / "base" / "gsm8k" / "metrics.json").unlink()
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert second.count("cached") == 2 + 1 + 7  # two adapters, one merge, 7 of 8 evaluations
    assert "eval base on gsm8k: exact_match_flexible" in second
    assert (out / "eval" / "merge_average_seed0" / "ag_news" / "metrics.json").stat().st_mtime_ns == stamp

    # An expert retrained to other weights under the same settings (as on a nondeterministic GPU)
    # invalidates everything built on it: downstream keys hash the weights themselves.
    from loracombench import adapters, cache, io
    from loracombench.merging.factors import LoraFactors

    folder = out / "adapters" / "seed0" / "ag_news"
    key = io.read_json(folder / cache.MANIFEST)["key"]
    expert = adapters.read_adapter(folder)
    doubled = {m: LoraFactors(f.lora_A, 2 * f.lora_B, f.scale) for m, f in expert.factors.items()}
    adapters.write_factors(folder, doubled, expert.config, {k: v for k, v in expert.metadata.items() if k != "schema"})
    cache.record_outputs(folder, key)
    assert main(argv) == 0
    third = capsys.readouterr().out
    assert "merge average (seed 0): done" in third and "train ag_news (seed 0): cached" in third
    assert third.count("cached") == 2 + 4  # both adapters' training, base and gsm8k expert evaluations


def test_each_seed_retrains_the_experts_and_evaluates_on_the_same_examples(tmp_path, small_mirror):
    from loracombench import adapters, metrics

    out = tmp_path / "run"
    argv = ["run", "--config", str(write_config(tmp_path, seeds=[0, 3])), "--data-dir", str(small_mirror),
            "--out", str(out)]
    assert main(argv) == 0
    experts = [adapters.read_adapter(out / "adapters" / f"seed{s}" / "ag_news") for s in (0, 3)]
    assert [e.metadata["seed"] for e in experts] == [0, 3]
    module = next(iter(experts[0].factors))
    assert not experts[0].factors[module].lora_A.equal(experts[1].factors[module].lora_A)
    records = [metrics.read_result(out / "eval" / f"merge_average_seed{s}" / "ag_news") for s in (0, 3)]
    assert [r["model"]["seed"] for r in records] == [0, 3]
    assert {r["model"]["label"] for r in records} == {"merge: average"}
    assert metrics.read_result(out / "eval" / "base" / "ag_news")["model"]["seed"] is None
    gold = [[row["gold"] for row in io_rows(out / "eval" / f"merge_average_seed{s}" / "ag_news")] for s in (0, 3)]
    assert gold[0] == gold[1]


def io_rows(folder):
    import json

    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        load_config(write_config(tmp_path, learning_rate=1e-3))
    with pytest.raises(ValueError, match="valid"):
        ExperimentConfig(tasks=["ag_news", "mnli"])
    with pytest.raises(ValueError, match="missing"):
        ExperimentConfig(tasks=["ag_news", "gsm8k"], n_train={"ag_news": 4})
    with pytest.raises(ValueError, match="unknown"):
        ExperimentConfig(merges=[{"method": "nope"}])
    with pytest.raises(ValueError, match="no config file or preset"):
        load_config("no-such-preset")
    with pytest.raises(ValueError, match="distinct"):
        ExperimentConfig(seeds=[1, 1])
    with pytest.raises(ValueError, match="not run"):
        ExperimentConfig(train_per_task={"mnli": {"learning_rate": 1e-3}})
    with pytest.raises(ValueError, match="learning_rate"):
        ExperimentConfig(train_per_task={"gsm8k": {"learning_rate": -1}})
    per_task = ExperimentConfig(train={"learning_rate": 1e-3}, train_per_task={"gsm8k": {"learning_rate": 4e-3}})
    assert per_task.train_settings("gsm8k", 2).learning_rate == 4e-3
    assert per_task.train_settings("ag_news", 2).learning_rate == 1e-3 and per_task.train_settings("ag_news", 2).seed == 2
    with pytest.raises(ValueError, match="seeds"):
        ExperimentConfig(train={"seed": 2})


def test_presets_validate():
    for preset in ("default", "smoke", "original-gpt2", "seeds3", "shared-init"):
        assert load_config(preset).tasks == ["ag_news", "gsm8k"]


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"models", "data", "train", "merge", "eval", "run", "diagnose", "report", "eda", "baseline"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: loracombench" in capsys.readouterr().out


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["eval", "--task", "ag_news", "--model", "tiny-llama", "--data-dir", str(tmp_path / "none"),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loracombench eval: error:") and "does not exist" in err
    assert not (tmp_path / "o").exists()


def test_models_and_data_commands(capsys, small_mirror):
    assert main(["models"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out
    assert main(["data", "--data-dir", str(small_mirror)]) == 0
    shown = capsys.readouterr().out
    assert "gsm8k" in shown and "validation" in shown


def test_each_tasks_eval_config_records_the_generations_its_sample_allows(tmp_path):
    """n_generate is one number for every task; a task with fewer evaluation rows generates them
    all, and its records say how many that was."""
    from loracombench.config import ExperimentConfig
    from loracombench.pipeline import Experiment

    config = ExperimentConfig(**{**SMOKE, "eval": {**SMOKE["eval"], "n_eval": {"ag_news": 8, "gsm8k": 3},
                                                   "n_generate": 4}})
    experiment = Experiment(config, tmp_path / "run")
    assert experiment.eval_config("gsm8k").n_generate == 3
    assert experiment.eval_config("ag_news").n_generate == 4
