"""Choosing settings on validation data: the rows used, the sweep, the verbalizer comparison."""

from __future__ import annotations

import json

import pytest

from loracombench.config import ExperimentConfig
from loracombench.data import DataError, load_sample, validation_sample

CONFIG = {
    "name": "t", "model": "tiny-llama", "n_train": {"ag_news": 8, "gsm8k": 4},
    "train": {"epochs": 1, "batch_size": 4, "max_length": 64},
    "eval": {"n_eval": {"ag_news": 8, "gsm8k": 3}, "n_generate": 0, "max_new_tokens": 4},
    "merges": [{"method": "average"}], "baselines": False,
}


def test_validation_rows_never_overlap_the_training_sample_or_test(small_mirror):
    training = load_sample("gsm8k", "train", 4, 0, small_mirror)
    held_out = validation_sample("gsm8k", None, 0, small_mirror, training)
    assert len(held_out) == 2 and not [row for row in held_out if row in training]
    # A task with a validation split uses it.
    ag_news = validation_sample("ag_news", None, 0, small_mirror, load_sample("ag_news", "train", 8, 0, small_mirror))
    assert ag_news == load_sample("ag_news", "validation", None, 0, small_mirror)
    with pytest.raises(DataError, match="no rows are left"):
        validation_sample("gsm8k", None, 0, small_mirror, load_sample("gsm8k", "train", None, 0, small_mirror))
    # More held-out rows than there are is refused, as a sample larger than a split is, naming its key.
    with pytest.raises(DataError, match=r"n_validation=3 asks for more gsm8k validation rows .* \(2\)"):
        validation_sample("gsm8k", 3, 0, small_mirror, training, what="n_validation")
    assert len(validation_sample("gsm8k", 2, 0, small_mirror, training)) == 2


def test_sweep_trains_each_rate_scores_validation_and_resumes(tmp_path, small_mirror, capsys):
    from loracombench.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(CONFIG))
    argv = ["sweep", "--config", str(config), "--learning-rates", "1e-3", "5e-2", "--data-dir", str(small_mirror),
            "--out", str(tmp_path / "sweep")]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    for task, metric in (("ag_news", "accuracy"), ("gsm8k", "gold_nll")):
        result = summary["tasks"][task]
        values = {p["learning_rate"]: p[metric] for p in result["points"]}
        pick = max if result["higher_is_better"] else min
        assert result["best_learning_rate"] == pick(values, key=values.get)
    # Validation scores come from the validation rows, and the test split is never read.
    record = json.loads((tmp_path / "sweep" / "lr0.001" / "validation" / "gsm8k" / "metrics.json").read_text())
    assert record["split"] == "validation" and record["n"] == 2
    capsys.readouterr()
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert log.count("(seed 0): cached") == 4 and log.count("validation expert_") == 4  # nothing recomputed


def test_verbalizer_comparison_scores_each_label_set(tmp_path, small_mirror):
    from loracombench.sweep import compare_verbalizers

    config = ExperimentConfig(**CONFIG, data_dir=str(small_mirror))
    summary = compare_verbalizers(config, "ag_news", [("World", "Sports", "Business", "Sci/Tech"),
                                                      ("World", "Sports", "Business", "Technology")],
                                  None, tmp_path / "v", progress=False)
    assert [c["labels"][-1] for c in summary["candidates"]] == ["Sci/Tech", "Technology"]
    for candidate in summary["candidates"]:
        assert sum(candidate["predicted"]) == summary["n_validation"] == 8
        assert set(candidate["recall"]) == set(candidate["labels"])
    assert "Technology" in (tmp_path / "v" / "verbalizers.md").read_text()


def test_verbalizers_score_in_the_configs_precision(tmp_path, small_mirror, monkeypatch):
    from loracombench import sweep

    dtypes = []
    real = sweep.evaluate
    monkeypatch.setattr(sweep, "evaluate", lambda *args, **kwargs: dtypes.append(args[4].dtype) or real(*args, **kwargs))
    config = ExperimentConfig(**CONFIG, data_dir=str(small_mirror), dtype="fp32")
    sweep.compare_verbalizers(config, "ag_news", [("World", "Sports", "Business", "Sci/Tech")], None, tmp_path / "v",
                              progress=False)
    assert dtypes == ["fp32"]


@pytest.mark.parametrize("extra, message", [
    (["--learning-rates", "0"], "--learning-rates must be positive"),
    (["--learning-rates", "1e-3", "--tasks", "mnli"], "--tasks mnli: not a task of the config"),
    (["--learning-rates", "1e-3", "--n-validation", "0"], "--n-validation"),
])
def test_sweep_refuses_bad_input_with_one_line(tmp_path, small_mirror, capsys, extra, message):
    from loracombench.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(CONFIG))
    argv = ["sweep", "--config", str(config), "--data-dir", str(small_mirror), "--out", str(tmp_path / "s"), *extra]
    try:
        status = main(argv)
    except SystemExit as exit_info:  # argparse's own refusals
        status = exit_info.code
    err = capsys.readouterr().err.strip()
    assert status == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_sweep_and_verbalizers_refuse_a_foreign_out_folder(tmp_path, small_mirror, capsys):
    from loracombench.cli import main

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(CONFIG))
    common = ["--config", str(config), "--data-dir", str(small_mirror), "--out", str(foreign)]
    assert main(["sweep", "--learning-rates", "1e-3", *common]) == 2
    assert main(["verbalizers", "--candidates", "a,b,c,d", *common]) == 2
    assert "does not hold" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
