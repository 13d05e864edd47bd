"""A task owns everything task-specific: two toy tasks defined here, and nowhere else, run the
whole pipeline beside AG News and GSM8K (training, merging, evaluation, baselines, report), the
`eda` and `baseline` commands, and leave the registry as they found it.

toy_sum is a generation task with its own answer extraction, baselines and EDA hooks; toy_colour
is the least a multiple-choice task declares (no baselines, no EDA of its own)."""

from __future__ import annotations

import csv
import json
import re

import pytest
from conftest import run_subcommand as run_cli
from conftest import write_jsonl

from loracombench import baselines
from loracombench.config import ExperimentConfig
from loracombench.pipeline import run_experiment
from loracombench.tasks import TASKS, Baseline, ReportMetric, Task, classical, eda_tools, registered, unregister

ANSWER = re.compile(r"= (-?\d+)")


class ToySum(Task):
    name = "toy_sum"
    title = "Toy sums"
    description = "toy: the sum of two small numbers, answered by generation (test-only task)"
    hub_path = "none/toy_sum"  # never loaded: the test's mirror holds the task
    splits = hub_splits = ("train", "test")
    fields = {"a": int, "b": int}
    kind = "generation"
    primary_metric = "exact_match"
    selection_metric = ("gold_nll", False)
    chance = 0.0
    report_metrics = (ReportMetric("exact_match", "toy sum EM", True, "binary", field="correct"),
                      ReportMetric("gold_nll", "toy sum gold NLL ↓", False, "mean", field="gold_nll"))
    retention_metric = "gold_nll"
    stop_strings = ("\n",)
    generation_metrics = {"exact_match": "correct"}
    eda_splits = ("train",)

    def prompt(self, row: dict) -> str:
        return f"{row['a']} + {row['b']}"

    def target(self, row: dict) -> str:
        return f" = {row['a'] + row['b']}"

    def reference_answer(self, row: dict) -> str:
        return str(row["a"] + row["b"])

    def score_output(self, output: str, row: dict) -> dict:
        found = ANSWER.search(output)  # only what follows "= " is an answer
        answer = found.group(1) if found else None
        return {"answer": answer, "correct": answer == self.reference_answer(row)}

    def answer_as_output(self, answer: str) -> str:
        return f" = {answer}"

    def baselines(self) -> tuple[Baseline, ...]:
        def add(train, evaluation, seed):
            return [{"prediction": str(row["a"] + row["b"])} for row in evaluation]

        return Baseline("sum_rule", {"rule": "a + b"}, add), classical.majority_answer(self.reference_answer)

    def eda_stats(self, splits: dict[str, list[dict]]) -> dict:
        return {"splits": {name: {"n": len(rows), "sum": eda_tools.summarize([r["a"] + r["b"] for r in rows])}
                           for name, rows in splits.items()}}

    def eda_plots(self, stats, splits, out_dir):
        fig, (ax,) = eda_tools.figure()
        ax.hist([r["a"] + r["b"] for r in splits["train"]])
        return [eda_tools.save_figure(fig, out_dir / f"{self.name}_sums.png")]

    def eda_summary(self, stats: dict) -> list[str]:
        return [f"{self.name}: mean train sum {stats['splits']['train']['sum']['mean']:.2f}"]


COLOURS = ("red", "blue")


class ToyColour(Task):
    name = "toy_colour"
    description = "toy: which of two colours a sentence names, as multiple choice (test-only task)"
    hub_path = "none/toy_colour"
    splits = hub_splits = ("train", "test")
    fields = {"sentence": str, "label": int}
    kind = "multiple_choice"
    primary_metric = "accuracy"
    selection_metric = ("accuracy", True)
    chance = 1 / len(COLOURS)
    report_metrics = (ReportMetric("accuracy", "toy colour acc", True, "binary", field="correct"),)
    retention_metric = "accuracy"
    target_ends_with_eos = False

    def prompt(self, row: dict) -> str:
        return f"{row['sentence']}\nColour:"

    def choices(self, row: dict) -> list[str]:
        return list(COLOURS)

    def gold_index(self, row: dict) -> int:
        return row["label"]

    def target(self, row: dict) -> str:
        return " " + COLOURS[row["label"]]


# Train sums 3, 3, 3, 3, 2, 5, 5, 7: the majority answer is 3, right on 2 of the 4 test rows.
SUM_TRAIN = [{"a": a, "b": b} for a, b in [(1, 2), (2, 1), (0, 3), (3, 0), (1, 1), (2, 3), (4, 1), (5, 2)]]
SUM_TEST = [{"a": a, "b": b} for a, b in [(1, 2), (3, 3), (2, 2), (0, 3)]]
COLOUR_ROWS = [{"sentence": f"The {thing} is {COLOURS[label]}.", "label": label}
               for thing in ("car", "sky", "door", "ball") for label in (0, 1)]


@pytest.fixture
def toy_tasks():
    with registered(ToySum()), registered(ToyColour()):
        yield


@pytest.fixture
def toy_mirror(small_mirror):
    """The AG News and GSM8K mirror with the toy tasks' splits beside them."""
    write_jsonl(small_mirror / "toy_sum" / "train.jsonl", SUM_TRAIN)
    write_jsonl(small_mirror / "toy_sum" / "test.jsonl", SUM_TEST)
    write_jsonl(small_mirror / "toy_colour" / "train.jsonl", COLOUR_ROWS)
    write_jsonl(small_mirror / "toy_colour" / "test.jsonl", COLOUR_ROWS[:6])
    return small_mirror


def test_registered_tasks_leave_the_registry_as_they_found_it():
    before = dict(TASKS)
    with pytest.raises(RuntimeError, match="inside"):
        with registered(ToySum()) as task:
            assert TASKS["toy_sum"] is task
            with pytest.raises(ValueError, match="already registered"):
                with registered(ToySum()):
                    pass
            raise RuntimeError("inside the block")
    assert TASKS == before
    with pytest.raises(ValueError, match="unknown task 'toy_sum'; valid tasks: ag_news, gsm8k"):
        unregister("toy_sum")


def test_registry_rejects_repeated_baseline_names_and_unknown_eda_splits():
    class Repeated(ToySum):
        def baselines(self):
            return (classical.majority_answer(self.reference_answer),) * 2

    class NoSuchSplit(ToySum):
        eda_splits = ("validation",)

    with pytest.raises(ValueError, match="baselines' names repeat"):
        with registered(Repeated()):
            pass
    with pytest.raises(ValueError, match=r"eda_splits \['validation'\] are not among its splits \(train, test\)"):
        with registered(NoSuchSplit()):
            pass
    assert "toy_sum" not in TASKS


def rows_of(path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_toy_tasks_run_end_to_end_with_baselines_and_report(tmp_path, toy_mirror, toy_tasks, fast_bootstrap):
    tasks = ["ag_news", "gsm8k", "toy_sum", "toy_colour"]
    config = ExperimentConfig.model_validate({
        "name": "third-task", "model": "tiny-llama", "data_dir": str(toy_mirror), "tasks": tasks,
        "n_train": {"ag_news": 8, "gsm8k": 4, "toy_sum": 8, "toy_colour": 8},
        "train": {"epochs": 1, "batch_size": 4, "max_length": 64},
        "eval": {"n_eval": {"ag_news": 8, "gsm8k": 3, "toy_sum": 4, "toy_colour": 6}, "n_generate": 4,
                 "max_new_tokens": 4},
        "merges": [{"method": "average"}], "baselines": True})
    out = tmp_path / "run"
    run_experiment(config, out, progress=False)

    rows = rows_of(out / "results.csv")
    scores = {(r["model"], r["task"], r["metric"]): float(r["value"]) for r in rows if r["statistic"] == "score"}
    models = {"base", "merge: average", *(f"{task} expert" for task in tasks)}
    for task in tasks:
        assert {m for m, t, _ in scores if t == task} >= models, task
    # The rule baseline answers through the task's answer_as_output and is read by its own extraction.
    assert scores[("baseline: sum_rule", "toy_sum", "exact_match")] == 1.0
    assert scores[("baseline: majority_answer", "toy_sum", "exact_match")] == 0.5
    assert not [m for m, t, _ in scores if t == "toy_colour" and m.startswith("baseline")]  # it declares none
    retention = {(r["model"], r["task"]) for r in rows if r["statistic"] == "retention"}
    assert {("merge: average", "toy_sum"), ("merge: average", "toy_colour")} <= retention
    table = (out / "results.md").read_text()
    assert "toy sum EM" in table and "toy colour acc" in table and "toy_sum retention (gold_nll)" in table


def test_eda_and_baseline_commands_serve_the_toy_tasks(tmp_path, toy_mirror, toy_tasks, capsys):
    out = tmp_path / "eda"
    assert run_cli(["eda", "--task", "toy_sum", "toy_colour", "--data-dir", str(toy_mirror), "--out", str(out),
                    "--no-tokens"]) == 0
    record = json.loads((out / "eda_stats.json").read_text())
    assert record["plots"] == ["toy_sum_sums.png"]
    assert record["tasks"]["toy_sum"]["splits"]["train"]["sum"]["mean"] == 31 / 8
    # a task without EDA hooks of its own gets the generic statistics alone
    assert set(record["tasks"]["toy_colour"]) == {"task", "description", "length_unit", "shared_prompts",
                                                  "token_lengths"}
    assert "toy_sum: mean train sum 3.88" in capsys.readouterr().out

    out = tmp_path / "baselines"
    assert run_cli(["baseline", "--task", "toy_sum", "--data-dir", str(toy_mirror), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["majority_answer", "sum_rule"]
    with pytest.raises(SystemExit):  # argparse: toy_colour is not among the tasks with baselines
        run_cli(["baseline", "--task", "toy_colour", "--data-dir", str(toy_mirror), "--out", str(out)])


def test_a_task_without_baselines_has_none_and_a_wrong_count_is_named(toy_tasks):
    assert baselines.evaluate_baselines("toy_colour", COLOUR_ROWS, COLOUR_ROWS) == []

    class OneAnswer(ToySum):
        name = "toy_one_answer"

        def baselines(self):
            return (Baseline("three", {"rule": "3, once"}, lambda train, evaluation, seed: [{"prediction": "3"}]),)

    with registered(OneAnswer()):
        with pytest.raises(ValueError, match="baseline 'three' of task 'toy_one_answer' gave 1 predictions "
                                             "for 4 evaluation rows"):
            baselines.evaluate_baselines("toy_one_answer", SUM_TRAIN, SUM_TEST)
