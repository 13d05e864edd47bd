"""Classical baselines, run: each task declares its own (Task.baselines; the builders are in
tasks/classical.py), and this module fits them on training rows, predicts evaluation rows and
scores the predictions the way the task scores a model, by the task's kind.

They report the same metrics, intervals and result-file format as model evaluations
(metrics.result_record / metrics.write_result), and each result's config records what the
baseline is. `evaluate_baselines` does no I/O; `run_baselines` writes one result folder per baseline.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
import time
from pathlib import Path

from . import cache, metrics
from .data import check_rows
from .tasks import Task, get_task


def _score_choices(task: Task, predicted: list[int], rows: list[dict]) -> tuple[dict, list[dict]]:
    scored = []
    for index, (row, prediction) in enumerate(zip(rows, predicted)):
        gold, choices = task.gold_index(row), task.choices(row)
        scored.append({"index": index, "gold": gold, "prediction": prediction, "correct": gold == prediction,
                       "gold_label": choices[gold], "predicted_label": choices[prediction]})
    return metrics.classification_metrics([r["gold"] for r in scored], list(predicted), task.choices(rows[0])), scored


def _score_answers(task: Task, predicted: list[dict], rows: list[dict]) -> tuple[dict, list[dict]]:
    scored = [{"index": index, "gold": task.reference_answer(row), **extra,
               **task.score_output(task.answer_as_output(extra["prediction"]), row)}
              for index, (row, extra) in enumerate(zip(rows, predicted))]
    return metrics.proportions(scored, task.generation_metrics), scored


# How a baseline's predictions are scored, by the task's kind (as evaluation.EVALUATORS scores models).
SCORERS = {"multiple_choice": _score_choices, "generation": _score_answers}


def code_fingerprint() -> str:
    """A hash of the code that fits and scores the baselines (this module and tasks/classical.py),
    for their cache keys: a fix there recomputes the baselines and nothing else."""
    from .tasks import classical

    sources = (inspect.getsource(sys.modules[__name__]) + inspect.getsource(classical)).encode()
    return hashlib.sha256(sources).hexdigest()[:16]


def baseline_names(task_name: str) -> list[str]:
    """The task's baselines, in the order they run; empty when it declares none."""
    return [baseline.name for baseline in get_task(task_name).baselines()]


def _evaluate(task_name: str, train_rows, eval_rows, seed: int, only: str | None = None):
    task = get_task(task_name)
    check_rows(task, train_rows, f"{task.name} train")
    check_rows(task, eval_rows, f"{task.name} evaluation")
    if only is not None and only not in baseline_names(task_name):
        raise ValueError(f"task {task.name!r} has no baseline {only!r}; its baselines: "
                         f"{', '.join(baseline_names(task_name)) or 'none'}")
    results = []
    for baseline in task.baselines():
        if only is not None and baseline.name != only:
            continue
        started = time.time()
        predicted = list(baseline.predict(train_rows, eval_rows, seed))
        if len(predicted) != len(eval_rows):
            raise ValueError(f"baseline {baseline.name!r} of task {task.name!r} gave {len(predicted)} "
                             f"predictions for {len(eval_rows)} evaluation rows")
        scores, predictions = SCORERS[task.kind](task, predicted, eval_rows)
        results.append((baseline, scores, predictions, time.time() - started))
    return task, results


def evaluate_baselines(task_name: str, train_rows: list[dict], eval_rows: list[dict],
                       seed: int = 0, only: str | None = None) -> list[tuple[str, dict, list[dict]]]:
    """(baseline name, metrics, predictions) for every baseline of the task, or only the one
    named; no I/O."""
    _, results = _evaluate(task_name, train_rows, eval_rows, seed, only)
    return [(baseline.name, scores, predictions) for baseline, scores, predictions, _ in results]


def run_baselines(task_name: str, train_rows: list[dict], eval_rows: list[dict], out_dir,
                  seed: int = 0, split: str = "test", config: dict | None = None) -> list[Path]:
    """Evaluate every baseline, then write out_dir/<baseline>/{predictions.jsonl,metrics.json}.

    Nothing is written unless every baseline succeeded. `config` (e.g. the sample sizes the
    caller drew) is merged into each result's config. Returns the result folders."""
    task, results = _evaluate(task_name, train_rows, eval_rows, seed)
    folders = []
    for baseline, scores, predictions, elapsed in results:
        record = baseline_record(
            task, {"label": baseline.name, "kind": "baseline"}, scores, split=split, n=len(eval_rows), seed=seed,
            config={"baseline": baseline.name, **baseline.config, "n_train": len(train_rows), **(config or {})},
            elapsed_s=round(elapsed, 3))
        folder = Path(out_dir) / baseline.name
        metrics.write_result(folder, record, predictions, eval_rows)
        folders.append(folder)
    return folders


def baseline_record(task: Task, model: dict, scores: dict, *, split: str, n: int, seed: int, config: dict,
                    elapsed_s: float | None = None) -> dict:
    """A baseline's result record: the task's primary metric and chance, and as its environment
    the versions of the libraries that fit it."""
    return metrics.result_record(task=task.name, split=split, n=n, seed=seed, model=model, metrics=scores,
                                 primary_metric=task.primary_metric, chance=task.chance, config=config,
                                 elapsed_s=elapsed_s, environment=cache.code_versions(cache.BASELINE_LIBRARIES),
                                 task_version=task.fingerprint())
