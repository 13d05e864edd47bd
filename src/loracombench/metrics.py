"""Metrics with confidence intervals, and the one result-file format every evaluation writes.

A result folder holds metrics.json (self-describing: task, split, sample, model, metrics with
95% intervals) and predictions.jsonl (one line per example). Model evaluations and classical
baselines share it, so the report treats them alike.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from . import io

SCHEMA = "loracombench.eval/1"
Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; well behaved at 0 and 1, unlike Wald."""
    if n <= 0:
        raise ValueError("a proportion needs at least one trial")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(successes: int, n: int) -> dict:
    low, high = wilson_interval(successes, n)
    return {"value": successes / n, "ci_low": low, "ci_high": high, "n": n, "interval": "wilson95"}


def proportions(rows: list[dict], fields: dict[str, str]) -> dict:
    """{metric: proportion of rows whose boolean `field` is true} for each (metric, field)."""
    return {metric: proportion(sum(bool(r[field]) for r in rows), len(rows)) for metric, field in fields.items()}


def bootstrap_mean(values, seed: int = 0, resamples: int = 2000) -> dict:
    """Mean with a percentile-bootstrap 95% interval (for per-example losses and F1-like scores)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("a mean needs at least one value")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (resamples, values.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"value": float(values.mean()), "ci_low": float(low), "ci_high": float(high),
            "n": int(values.size), "interval": "bootstrap95"}


def bootstrap_statistic(statistic, gold, predicted, seed: int = 0, resamples: int = 1000) -> dict:
    """A corpus-level statistic (e.g. macro-F1) with a percentile-bootstrap 95% interval.
    `statistic(gold, predicted)` takes arrays with leading batch axes: all resamples in one call."""
    gold, predicted = np.asarray(gold), np.asarray(predicted)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, gold.size, (resamples, gold.size))
    low, high = np.percentile(statistic(gold[idx], predicted[idx]), [2.5, 97.5])
    return {"value": float(statistic(gold, predicted)), "ci_low": float(low), "ci_high": float(high),
            "n": int(gold.size), "interval": "bootstrap95"}


def classification_metrics(gold: list[int], predicted: list[int], class_names: list[str]) -> dict:
    """Accuracy, macro-F1, and each class's recall (recall_<class>), which shows a model that
    cannot predict a class at all; the confusion matrix is confusion_matrix()'s job."""
    from .stats import macro_f1

    n_classes = len(class_names)
    correct = sum(int(g == p) for g, p in zip(gold, predicted))
    result = {"accuracy": proportion(correct, len(gold)),
              "macro_f1": bootstrap_statistic(lambda g, p: macro_f1(g, p, n_classes), gold, predicted)}
    for label, name in enumerate(class_names):
        members = [p for g, p in zip(gold, predicted) if g == label]
        if members:
            result[f"recall_{name.strip()}"] = proportion(sum(p == label for p in members), len(members))
    return result


def confusion_matrix(gold: list[int], predicted: list[int], class_names: list[str]) -> dict:
    """Counts[g][p]: gold class g predicted as p, with the class names in order."""
    counts = [[0] * len(class_names) for _ in class_names]
    for g, p in zip(gold, predicted):
        counts[g][p] += 1
    return {"classes": [name.strip() for name in class_names], "counts": counts}


def model_label(name: str, kind: str) -> str:
    """What a result's model.label calls a merge or composition configured as `name`: static
    merges are prefixed "merge: " so that a table tells them from compositions of the same name."""
    return f"merge: {name}" if kind == "merge" else name


def result_record(*, task: str, split: str, n: int, seed: int, model: dict, metrics: dict,
                  primary_metric: str, chance: float, config: dict | None = None,
                  elapsed_s: float | None = None, details: dict | None = None,
                  environment: dict | None = None, task_version: dict | None = None) -> dict:
    """`metrics` maps names to values with intervals; `details` holds what is not one number
    (a confusion matrix, say); `environment` what computed them (models.environment);
    `task_version` the task's prompt and scoring version (Task.fingerprint), as lm-eval records
    its tasks' versions."""
    return {
        "schema": SCHEMA,
        "task": task,
        "task_version": task_version,
        "split": split,
        "n": n,
        "seed": seed,
        "model": model,
        "primary_metric": primary_metric,
        "chance": chance,
        "metrics": metrics,
        "config": config or {},
        "elapsed_s": elapsed_s,
        "details": details or {},
        "environment": environment or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_result(out_dir: str | Path, record: dict, predictions: list[dict], docs: list[dict]) -> Path:
    """predictions.jsonl and metrics.json, published together (io.atomic_dir): an interrupted
    rewrite of a result folder leaves the earlier result whole, never new predictions beside old
    metrics, which the report would pair. Each prediction carries its dataset row as "doc" (as
    lm-eval's logged samples do), so that an example can be read without redrawing the sample."""
    if len(docs) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(docs)} dataset rows")
    out_dir = Path(out_dir)
    with io.atomic_dir(out_dir) as staging:
        io.write_jsonl(staging / "predictions.jsonl", [{**p, "doc": doc} for p, doc in zip(predictions, docs)])
        io.write_json(staging / "metrics.json", record)
    return out_dir / "metrics.json"


def read_result(out_dir: str | Path) -> dict:
    record = io.read_json(Path(out_dir) / "metrics.json")
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        raise ValueError(f"{out_dir}/metrics.json is not a {SCHEMA} result")
    return record


def read_predictions(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "predictions.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} is missing: every result folder holds predictions.jsonl beside metrics.json")
    return io.read_jsonl(path)
