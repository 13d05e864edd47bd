"""Choosing training settings on validation data, never on test.

`sweep_learning_rates` trains each task's expert at every learning rate of a grid, with
everything else as in the experiment config, and scores it on the task's validation rows
(data.validation_sample: the validation split, or train rows outside the training sample).
Each task's selection metric (Task.selection_metric) picks the winner. Trained adapters and
scores are cached cells, so an interrupted sweep resumes.

`compare_verbalizers` scores the base model on validation rows with each candidate label set of a
multiple-choice task, to choose label words that the base model is able to predict at all.
"""

from __future__ import annotations

from pathlib import Path

from . import io
from .config import ExperimentConfig
from .evaluation import EvalConfig, evaluate, evaluate_composed
from .metrics import read_result
from .pipeline import SCORING, Cell, Experiment, cell_key, log
from .tasks import get_task


def validation_rows(experiment: Experiment, task: str, n: int | None) -> list[dict]:
    return experiment.validation_rows(task, n, what="--n-validation")


def score_cell(experiment: Experiment, entry, task, rows: list[dict], folder: Path) -> dict:
    """The validation record of one trained expert (a cached cell keyed by the expert and the rows)."""
    config = EvalConfig(n_eval=len(rows), n_generate=0, batch_size=experiment.config.eval.batch_size,
                        seed=experiment.config.eval.seed, split="validation", dtype=experiment.precision)
    key = cell_key({"model": entry.key, "rows": experiment.rows_key(rows), "eval": config.__dict__, "scoring": SCORING},
                   task.name)
    Cell(f"validation {entry.slug}", folder, key, lambda: evaluate_composed(
        entry.load(), experiment.shared, task, rows, config, {**entry.info(), "cell_key": key}, out_dir=folder,
        progress=experiment.progress)).ensure()
    return read_result(folder)


def sweep_learning_rates(config: ExperimentConfig, learning_rates: list[float], out_dir: str | Path,
                         n_validation: dict[str, int | None], progress: bool = True) -> dict:
    out = Path(out_dir)
    seed = config.seeds[0]
    fingerprint = Experiment(config, out).shared.loaded.fingerprint
    results = {}
    for name in config.tasks:
        task = get_task(name)
        metric, higher_is_better = task.selection_metric
        rows = None
        points = []
        for rate in learning_rates:
            trial = config.model_copy(update={"train_per_task": {name: {
                **config.train_per_task.get(name, {}), "learning_rate": rate}}})
            experiment = Experiment(trial, out / f"lr{rate:g}", progress)
            rows = rows or validation_rows(experiment, name, n_validation.get(name))
            cell = experiment.train_cell(name, fingerprint, seed)
            cell.ensure()
            entry = experiment.expert_entry(name, cell, seed)
            record = score_cell(experiment, entry, task, rows, out / f"lr{rate:g}" / "validation" / name)
            value = record["metrics"][metric]
            points.append({"learning_rate": rate, metric: value["value"], "ci_low": value["ci_low"],
                           "ci_high": value["ci_high"], "final_train_loss": _final_loss(entry.adapter)})
            log(f"sweep {name} lr {rate:g}: validation {metric} = {value['value']:.4f}")
        best = (max if higher_is_better else min)(points, key=lambda p: p[metric])
        results[name] = {"metric": metric, "higher_is_better": higher_is_better, "n_validation": len(rows),
                         "points": points, "best_learning_rate": best["learning_rate"]}
    summary = {"config": config.model_dump(), "seed": seed, "learning_rates": learning_rates, "tasks": results}
    io.write_json(out / "sweep.json", summary)
    io.write_text(out / "sweep.md", sweep_markdown(summary))
    return summary


def _final_loss(adapter: Path) -> float | None:
    from .adapters import read_metadata

    return (read_metadata(adapter) or {}).get("final_loss")


def sweep_markdown(summary: dict) -> str:
    lines = [f"Learning-rate sweep on validation data (seed {summary['seed']}); test data is never read.", ""]
    for name, result in summary["tasks"].items():
        metric = result["metric"]
        arrow = "↑" if result["higher_is_better"] else "↓"
        lines += [f"### {name}: validation {metric} {arrow} (n = {result['n_validation']})", "",
                  f"| learning rate | {metric} | 95% interval | final training loss |", "| --- | --- | --- | --- |"]
        for p in result["points"]:
            mark = " **(chosen)**" if p["learning_rate"] == result["best_learning_rate"] else ""
            loss = "–" if p["final_train_loss"] is None else f"{p['final_train_loss']:.3f}"
            lines.append(f"| {p['learning_rate']:g}{mark} | {p[metric]:.4f} | [{p['ci_low']:.4f}, {p['ci_high']:.4f}] "
                         f"| {loss} |")
        lines.append("")
    return "\n".join(lines)


def compare_verbalizers(config: ExperimentConfig, task_name: str, candidates: list[tuple[str, ...]],
                        n_validation: int | None, out_dir: str | Path, progress: bool = True) -> dict:
    """The base model's validation accuracy, acc_norm and per-class recall with each label set."""
    experiment = Experiment(config, out_dir, progress)
    rows = validation_rows(experiment, task_name, n_validation)
    loaded = experiment.shared.loaded
    eval_config = EvalConfig(n_eval=len(rows), batch_size=config.eval.batch_size, seed=config.eval.seed,
                             split="validation", dtype=experiment.precision)
    results = []
    for labels in candidates:
        task = type(get_task(task_name))(labels=tuple(labels))
        record = evaluate(loaded.model, loaded.tokenizer, task, rows, eval_config, {"label": "base", "kind": "base"},
                          progress=progress)
        recalls = {k.removeprefix("recall_"): v["value"] for k, v in record["metrics"].items() if k.startswith("recall_")}
        results.append({"labels": list(labels), "accuracy": record["metrics"]["accuracy"]["value"],
                        "accuracy_norm": record["metrics"]["accuracy_norm"]["value"], "recall": recalls,
                        "predicted": [sum(col) for col in zip(*record["details"]["confusion_matrix"]["counts"])]})
        log(f"verbalizers {labels}: acc {results[-1]['accuracy']:.3f}, acc_norm {results[-1]['accuracy_norm']:.3f}")
    summary = {"task": task_name, "n_validation": len(rows), "model": config.model, "candidates": results}
    with io.atomic_dir(out_dir) as staging:  # with --overwrite, the earlier pair stays until both are new
        io.write_json(staging / "verbalizers.json", summary)
        io.write_text(staging / "verbalizers.md", verbalizers_markdown(summary))
    return summary


def verbalizers_markdown(summary: dict) -> str:
    lines = [f"Base model ({summary['model']}) on {summary['n_validation']} {summary['task']} validation rows, "
             "one row per candidate label set.", "",
             "| labels | acc | acc_norm | recall per class (acc) | predictions per class (acc) |",
             "| --- | --- | --- | --- | --- |"]
    for c in summary["candidates"]:
        recall = ", ".join(f"{k} {v:.2f}" for k, v in c["recall"].items())
        lines.append(f"| {' / '.join(c['labels'])} | {c['accuracy']:.3f} | {c['accuracy_norm']:.3f} | {recall} "
                     f"| {', '.join(map(str, c['predicted']))} |")
    return "\n".join(lines) + "\n"
