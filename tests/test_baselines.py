"""Classical baselines: hand-checkable toy cases, the `baseline` subcommand, the real mirror."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import MIRROR, needs_mirror, run_subcommand as run_cli
from conftest import write_mirror as write_splits

from loracombench import baselines, metrics
from loracombench.data import DataError, load_sample, load_split
from loracombench.tasks import get_task

# What each task declares, in order (its module's baselines()).
AG_NEWS_BASELINES = ["majority_class", "multinomial_nb", "tfidf_logreg", "tfidf_linear_svm"]
GSM8K_BASELINES = ["majority_answer", "tfidf_nearest_neighbour"]

TOPIC_WORDS = {0: "election minister war", 1: "goal match season", 2: "stocks profit market",
               3: "software internet chip"}
AG_TRAIN = [{"text": f"{TOPIC_WORDS[y]} report {i}", "label": y} for i in range(3) for y in range(4)]
AG_TRAIN.append({"text": "stocks profit market extra", "label": 2})  # Business is the majority
AG_TEST = [{"text": f"{TOPIC_WORDS[y].split()[i % 3]} news", "label": y} for i in range(2) for y in range(4)]

GSM_TRAIN = [
    {"question": "Tom has 3 apples and buys 2 more apples.", "answer": "3+2=5\n#### 5"},
    {"question": "A train travels 60 miles per hour for 2 hours.", "answer": "60*2=120\n#### 120"},
    {"question": "Sara had 10 dollars and spent 4 dollars.", "answer": "10-4=6\n#### 6"},
    {"question": "How many legs do 2 dogs have?", "answer": "2*4=8\n#### 8"},
    {"question": "Ann reads 5 pages a day for 2 days.", "answer": "5*2=10\n#### 10"},
    {"question": "Sam has 7 pens and loses 1 pen.", "answer": "7-1=6\n#### 6"},
]
GSM_TEST = [
    {"question": "A train travels 60 miles per hour for 2 hours?", "answer": "#### 120"},  # NN right
    {"question": "Tom has 3 apples and buys 2 more apples today.", "answer": "#### 6"},    # majority
    {"question": "Sara had 10 dollars and spent 4 dollars.", "answer": "#### 1,000"},       # nobody
]


def by_name(results):
    return {name: (scores, predictions) for name, scores, predictions in results}


def test_ag_news_baselines_on_separable_toy_data(fast_bootstrap):
    results = by_name(baselines.evaluate_baselines("ag_news", AG_TRAIN, AG_TEST, seed=0))
    assert list(results) == AG_NEWS_BASELINES
    scores, predictions = results["majority_class"]
    assert {p["prediction"] for p in predictions} == {2}
    assert scores["accuracy"]["value"] == pytest.approx(2 / 8)  # two Business rows in test
    for name in ("multinomial_nb", "tfidf_logreg", "tfidf_linear_svm"):
        scores, predictions = results[name]
        assert scores["accuracy"]["value"] == 1.0, name
        assert set(scores) == {"accuracy", "macro_f1"} | {f"recall_{label}" for label in get_task("ag_news").labels}
        assert predictions[0] == {"index": 0, "gold": 0, "prediction": 0, "correct": True,
                                  "gold_label": "World", "predicted_label": "World"}


def test_gsm8k_majority_and_nearest_neighbour():
    results = by_name(baselines.evaluate_baselines("gsm8k", GSM_TRAIN, GSM_TEST))
    assert list(results) == GSM8K_BASELINES
    scores, predictions = results["majority_answer"]
    assert [p["prediction"] for p in predictions] == ["6", "6", "6"]  # 6 occurs twice in train
    assert [p["correct_flexible"] for p in predictions] == [False, True, False]
    # A baseline writes "#### <answer>": both lm-eval extractions read the same number.
    assert [(p["strict"], p["flexible"]) for p in predictions] == [("6", "6")] * 3
    assert scores["exact_match_strict"] == scores["exact_match_flexible"] == scores["exact_match_numeric"]
    assert scores["exact_match_flexible"]["value"] == pytest.approx(1 / 3)

    scores, predictions = results["tfidf_nearest_neighbour"]
    assert [p["neighbour_index"] for p in predictions] == [1, 0, 2]
    assert [p["prediction"] for p in predictions] == ["120", "5", "6"]
    assert predictions[2]["similarity"] == pytest.approx(1.0)
    assert predictions[2]["gold"] == "1000"  # gold as lm-eval compares it: no thousands comma
    assert [p["correct_strict"] for p in predictions] == [True, False, False]
    assert scores["exact_match_flexible"]["value"] == pytest.approx(1 / 3)


def test_run_baselines_writes_result_files(tmp_path):
    folders = baselines.run_baselines("gsm8k", GSM_TRAIN, GSM_TEST, tmp_path / "out", seed=3)
    assert [f.name for f in folders] == GSM8K_BASELINES
    for folder in folders:
        record = metrics.read_result(folder)
        assert record["task"] == "gsm8k" and record["split"] == "test" and record["n"] == 3
        assert record["seed"] == 3 and record["primary_metric"] == "exact_match_flexible"
        assert record["model"] == {"label": folder.name, "kind": "baseline"}
        assert record["config"]["n_train"] == 6
        rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and {"index", "gold", "prediction", "correct_strict", "correct_flexible"} <= set(rows[0])


def test_bad_rows_are_rejected_before_writing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="evaluation: no rows"):
        baselines.run_baselines("ag_news", AG_TRAIN, [], out)
    with pytest.raises(DataError, match="missing field 'label'"):
        baselines.run_baselines("ag_news", [{"text": "x"}], AG_TEST, out)
    with pytest.raises(ValueError, match="unknown task"):
        baselines.evaluate_baselines("nope", AG_TRAIN, AG_TEST)
    assert not out.exists()


def write_mirror(root: Path) -> Path:
    return write_splits(root, {"ag_news": {"train": AG_TRAIN, "test": AG_TEST},
                                "gsm8k": {"train": GSM_TRAIN, "test": GSM_TEST}})


def test_baseline_command_writes_one_result_per_baseline(tmp_path, capsys, fast_bootstrap):
    mirror = write_mirror(tmp_path / "mirror")
    out = tmp_path / "baselines"
    assert run_cli(["baseline", "--task", "ag_news", "--data-dir", str(mirror), "--n-eval", "4",
                    "--seed", "1", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(AG_NEWS_BASELINES)
    for name in AG_NEWS_BASELINES:
        record = metrics.read_result(out / name)
        assert record["n"] == 4 and record["seed"] == 1 and record["chance"] == 0.25
        assert record["config"]["n_eval_requested"] == 4 and record["config"]["n_train"] == 13
    assert "tfidf_logreg" in capsys.readouterr().out


def test_baseline_command_with_a_missing_split_writes_nothing(tmp_path):
    mirror = write_mirror(tmp_path / "mirror")
    (mirror / "gsm8k" / "test.jsonl").unlink()
    out = tmp_path / "baselines"
    with pytest.raises(DataError, match="test.jsonl: file not found"):
        run_cli(["baseline", "--task", "gsm8k", "--data-dir", str(mirror), "--out", str(out)])
    (mirror / "gsm8k" / "test.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        run_cli(["baseline", "--task", "gsm8k", "--data-dir", str(mirror), "--out", str(out)])
    assert not out.exists()


@needs_mirror
def test_tfidf_logreg_beats_chance_and_majority_on_real_ag_news(fast_bootstrap):
    train = load_split("ag_news", "train", MIRROR)
    test = load_sample("ag_news", "test", 1000, seed=0, data_dir=MIRROR)
    results = by_name(baselines.evaluate_baselines("ag_news", train, test, seed=0))
    logreg = results["tfidf_logreg"][0]["accuracy"]
    majority = results["majority_class"][0]["accuracy"]
    assert logreg["n"] == 1000
    assert logreg["value"] > 0.82
    assert logreg["ci_low"] > majority["ci_high"] and logreg["ci_low"] > 0.25 + 0.5


def test_one_named_baseline_is_fitted_alone_and_an_unknown_name_is_refused(monkeypatch):
    import dataclasses

    from loracombench.tasks import get_task

    fitted = []
    task = get_task("ag_news")
    original = type(task).baselines

    def spied(baseline):
        def predict(*args):
            fitted.append(baseline.name)
            return baseline.predict(*args)
        return dataclasses.replace(baseline, predict=predict)

    monkeypatch.setattr(type(task), "baselines", lambda self: tuple(map(spied, original(self))))
    alone = baselines.evaluate_baselines("ag_news", AG_TRAIN, AG_TEST, seed=0, only="tfidf_logreg")
    assert [name for name, _, _ in alone] == ["tfidf_logreg"] and fitted == ["tfidf_logreg"]
    everything = by_name(baselines.evaluate_baselines("ag_news", AG_TRAIN, AG_TEST, seed=0))
    assert alone[0][1] == everything["tfidf_logreg"][0]
    with pytest.raises(ValueError, match="no baseline 'tfidf'.*tfidf_logreg"):
        baselines.evaluate_baselines("ag_news", AG_TRAIN, AG_TEST, only="tfidf")


def test_the_baseline_command_draws_a_runs_evaluation_rows_with_the_runs_seeds(tmp_path, fast_bootstrap):
    """A run draws its training rows with data_seed and its test rows with eval.seed; the command's
    defaults are the same, so its baselines score the rows the run's models are scored on."""
    from loracombench.config import EvalSettings
    from loracombench.data import load_sample

    mirror = write_mirror(tmp_path / "mirror")
    out = tmp_path / "baselines"
    assert run_cli(["baseline", "--task", "ag_news", "--data-dir", str(mirror), "--n-eval", "4",
                    "--out", str(out)]) == 0
    task = get_task("ag_news")
    run_rows = load_sample(task, "test", 4, EvalSettings().seed, mirror)
    golds = [p["gold"] for p in metrics.read_predictions(out / "majority_class")]
    assert golds == [task.gold_index(row) for row in run_rows]
    # Drawn with the training seed instead, as the command once did, the rows come in another order.
    assert [task.gold_index(r) for r in load_sample(task, "test", 4, 0, mirror)] != golds
