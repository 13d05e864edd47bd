"""Tables and plots built from result files alone (eval/<model>/<task>/{metrics.json, predictions.jsonl}).

A run records which result folders are its current cells (current_results.json); the report
shows exactly those, and lists any other result folder under eval/ as stale, never as a row.

Each task declares what the report shows (Task.report_metrics, Task.retention_metric), so a new
task needs no edit here. results.md holds three tables:

- scores: every model on every declared metric with its 95% interval; a compressed merge also
  shows its stored ΔW error. A label trained with several seeds gets one row per seed
  ("label (seed s)") and a "label: mean ± std over N seeds" row. Its notes say what computed the
  models' results (models.environment): the code's versions and the device's kernels, each
  environment with its count when the cells came from several (another machine, a Ray cluster).
- paired comparisons: every composed model (any kind but base, expert, baseline) against the
  original's factor average ("merge: average"), against each expert of the same seed and
  against the models the run's config names in `compare_with` (e.g. the best static merge), on
  the examples both answered (matched by "index"); see stats.py for the tests and intervals.
  Holm adjusts across the composed models of one seed, per task, metric and comparator.
- retention: (model − base)/(expert − base) on each task's retention metric, against that
  task's expert of the same seed, with a paired-bootstrap interval.

results.csv is long format, one number per row, with the columns CSV_COLUMNS:
  statistic       "score" (a model's metric on a task), "difference" (model − comparator),
                  "retention", "score mean over seeds", "retention mean over seeds"
  model, kind     the label (the same across seeds) and base|expert|merge|baseline
  seed            the training seed; empty for base, baselines and means over seeds
  task, split, metric
  comparator      difference: the other model's label; retention: the task's expert; else empty
  value, ci_low, ci_high, n, interval   the number, its 95% interval, examples, interval method
                  (a bootstrap interval over part of the resamples, where the value is undefined
                  in the others, says over how many; the tables mark it ‡)
  std, n_seeds    for means over seeds (sample standard deviation)
  test, p, p_holm, survives_holm        for differences
  relative_error  a compressed merge's relative error of its stored update, else empty
A number that is undefined (retention when the expert does not improve on the base, a difference
with a model whose per-example values are not all finite) is empty, and so is its test.
"""

from __future__ import annotations

import csv
import io as stdio
from collections import Counter
from pathlib import Path

import numpy as np

from . import cache, io, metrics, stats
from .config import stable_hash
from .tasks import get_task

CURRENT_RESULTS = "current_results.json"
CURRENT_SCHEMA = "loracombench.current-results/1"
KIND_ORDER = {"base": 0, "expert": 1, "merge": 2, "baseline": 3}
NOT_COMPOSED = ("base", "expert", "baseline")
AVERAGE_LABEL = metrics.model_label("average", "merge")
ALPHA = 0.05
PARTIAL_INTERVAL = "‡"  # an interval over the resamples where its value is defined
CSV_COLUMNS = ["statistic", "model", "kind", "seed", "task", "split", "metric", "comparator", "value",
               "ci_low", "ci_high", "n", "interval", "std", "n_seeds", "test", "p", "p_holm", "survives_holm",
               "relative_error"]


def write_current_results(run_dir: str | Path, folders: list[Path]) -> Path:
    """Record the result folders of the run's current cells (relative to the run folder), and
    which config.json they are the cells of."""
    run_dir = Path(run_dir)
    names = [Path(f).relative_to(run_dir).as_posix() for f in folders]
    return io.write_json(run_dir / CURRENT_RESULTS, {"schema": CURRENT_SCHEMA, "results": names,
                                                     "config_sha256": _config_hash(run_dir)})


def _config_hash(run_dir: Path) -> str | None:
    """Of the parsed config, so that reformatting the file (or git's line endings) changes nothing."""
    config = run_dir / "config.json"
    if not config.is_file():
        return None
    return stable_hash(io.read_json(config))


def _all_results(run_dir: Path) -> list[str]:
    return [f.parent.relative_to(run_dir).as_posix() for f in sorted(run_dir.glob("eval/*/*/metrics.json"))]


class UnfinishedRunError(ValueError):
    """A run folder whose run has not finished yet: its table would pass for a whole one."""


def current_results(run_dir: str | Path, partial: bool = False) -> list[str]:
    """The run's current result folders: those its manifest lists. A run writes config.json when
    it starts and the manifest when it ends: in between (an interrupted first run) every result
    there is taken only if `partial`. A folder that is no run, or a run by code older than the
    manifest (it kept no cell manifests either), gives every result."""
    run_dir = Path(run_dir)
    manifest = run_dir / CURRENT_RESULTS
    if not manifest.is_file():
        if not partial and _unfinished(run_dir):
            raise UnfinishedRunError(
                f"{run_dir}: its run has not finished ({CURRENT_RESULTS}, written when a run ends, is missing), "
                f"so a table of the {len(_all_results(run_dir))} result(s) there would look like the whole run's; "
                f"rerun `loracombench run` to finish it (finished cells are kept), or pass --partial")
        return _all_results(run_dir)
    recorded = io.read_json(manifest)
    if not isinstance(recorded, dict) or recorded.get("schema") != CURRENT_SCHEMA:
        raise ValueError(f"{manifest} is not a {CURRENT_SCHEMA} file; rerun `loracombench run` to rewrite it")
    # A run writes config.json when it starts and this list when it ends: a run with a changed
    # config that stopped in between left the earlier config's list beside some of its own cells.
    if recorded.get("config_sha256") not in (None, _config_hash(run_dir)):
        raise ValueError(f"{manifest} lists the results of another config than {run_dir}/config.json: a run with a "
                         f"changed config stopped before it finished; rerun it to finish (its finished cells are kept)")
    return list(recorded["results"])


def _unfinished(run_dir: Path) -> bool:
    """A run started by code that lists its cells when it ends, and not ended yet."""
    return ((run_dir / "config.json").is_file() and not (run_dir / CURRENT_RESULTS).is_file()
            and any(run_dir.glob(f"**/{cache.MANIFEST}")))


def stale_results(run_dir: str | Path) -> list[str]:
    """Result folders under eval/ that are not among the run's current cells."""
    if not (Path(run_dir) / CURRENT_RESULTS).is_file():
        return []  # an unfinished run's partial report shows every result there
    current = set(current_results(run_dir))
    return [name for name in _all_results(Path(run_dir)) if name not in current]


def collect(run_dir: str | Path, partial: bool = False) -> list[dict]:
    """One record per current (model, task) result of the run folder (see current_results)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: no such run folder")
    records = []
    for name in current_results(run_dir, partial):
        if not (run_dir / name / "metrics.json").is_file():
            raise ValueError(f"{run_dir}/{CURRENT_RESULTS} lists {name}, but its metrics.json is missing; "
                             f"rerun `loracombench run` to recompute it")
        # A cut or edited predictions.jsonl would otherwise be paired on the examples left in it.
        damage = cache.damage(run_dir / name)
        if damage:
            raise ValueError(f"{run_dir / name}: {damage} since its run wrote it; "
                             f"rerun `loracombench run` to recompute it")
        records.append(metrics.read_result(run_dir / name))
    if not records:
        raise ValueError(f"no results under {run_dir}/eval: run `loracombench run` first")
    _one_base(run_dir, records)
    return records


def _one_base(run_dir: Path, records: list[dict]) -> None:
    """Every language-model result of a table must come from one base model: a result folder of
    another base (copied in, or a run moved across checkpoints) would be compared and paired as if
    its differences were the composition's."""
    from .models import same_base

    based = [r for r in records if r["model"].get("base_model")]
    odd = [r for r in based if not same_base(r["model"]["base_model"], based[0]["model"]["base_model"])]
    if odd:
        def named(r: dict) -> str:
            return f"{r['model']['label']} on {r['task']} ({r['model']['base_model'].get('name')})"

        raise ValueError(f"{run_dir}: results of more than one base model: {named(based[0])} and "
                         f"{', '.join(named(r) for r in odd[:3])}{' ...' if len(odd) > 3 else ''}; "
                         f"rerun `loracombench run` into this folder to recompute them on one base")


def stale_note(run_dir: str | Path) -> str:
    stale = stale_results(run_dir)
    if not stale:
        return ""
    return (f"\nNot shown: {len(stale)} stale result folder(s) under eval/ that are not cells of this run's "
            f"config (kept on disk, safe to delete): {', '.join(stale)}.\n")


# ---------------------------------------------------------------- models, seeds, columns

def seed_of(record: dict):
    return record["model"].get("seed")


def _seed_order(seed) -> tuple:
    return (seed is not None, seed if seed is not None else 0)


def is_composed(record: dict) -> bool:
    return record["model"].get("kind") not in NOT_COMPOSED


def expert_task(model: dict) -> str | None:
    """The task an expert was trained on: model["task"] if recorded, else from its label
    ("<task> expert", as the pipeline names experts)."""
    if model.get("kind") != "expert":
        return None
    label = model["label"]
    return model.get("task") or (label[: -len(" expert")] if label.endswith(" expert") else None)


def model_order(records: list[dict]) -> list[str]:
    seen = {}
    for record in records:
        model = record["model"]
        seen.setdefault(model["label"], (KIND_ORDER.get(model.get("kind"), 9), model["label"]))
    return sorted(seen, key=seen.get)


def seeds_by_label(records: list[dict]) -> dict[str, list]:
    seeds: dict[str, set] = {}
    for record in records:
        seeds.setdefault(record["model"]["label"], set()).add(seed_of(record))
    return {label: sorted(values, key=_seed_order) for label, values in seeds.items()}


def several_seeds(records: list[dict]) -> bool:
    return any(len(seeds) > 1 for seeds in seeds_by_label(records).values())


def row_name(label: str, seed, seeds: dict[str, list]) -> str:
    """Single-seed labels keep their name; a label run with several seeds names the seed."""
    return label if len(seeds[label]) <= 1 else f"{label} (seed {seed})"


def mean_row_name(label: str, n_seeds: int) -> str:
    return f"{label}: mean ± std over {n_seeds} seeds"


def table_tasks(records: list[dict]) -> list:
    return [get_task(name) for name in sorted({r["task"] for r in records})]


def columns(records: list[dict]) -> list[tuple]:
    """(task, declared metric) for every declared metric some record of the task has."""
    present = {(r["task"], name) for r in records for name in r["metrics"]}
    return [(task, metric) for task in table_tasks(records) for metric in task.report_metrics
            if (task.name, metric.name) in present]


def relative_error(record: dict) -> float | None:
    return record["model"].get("relative_error")


def stored_errors(records: list[dict]) -> dict[tuple, float]:
    """(label, seed) -> the relative error of a compressed merge's stored update."""
    return {(r["model"]["label"], seed_of(r)): relative_error(r) for r in records if relative_error(r) is not None}


# ---------------------------------------------------------------- formatting

def _cell(value: dict | None, digits: int = 3) -> str:
    if value is None or value.get("value") is None:
        return "–"
    if value.get("ci_low") is None:
        return f"{value['value']:.{digits}f}"
    partial = PARTIAL_INTERVAL if value.get("undefined_resamples") else ""
    return f"{value['value']:.{digits}f} [{value['ci_low']:.{digits}f}, {value['ci_high']:.{digits}f}]{partial}"


def _signed_cell(value: dict, digits: int = 3) -> str:
    if value.get("value") is None:
        return "–"
    return f"{value['value']:+.{digits}f} [{value['ci_low']:+.{digits}f}, {value['ci_high']:+.{digits}f}]"


def _p(p: float | None) -> str:
    if p is None:
        return "–"
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def _mean_std(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |",
            *("| " + " | ".join(row) + " |" for row in rows)]


def seeded_rows(cells: dict[tuple, list[dict | None]], records: list[dict],
                text: dict[str, str] | None = None) -> list[list[str]]:
    """Table rows from {(label, seed): [value dict or None per column]}, in model order: one row
    per seed, and for a label with several seeds a "mean ± std" row over its seeds' values.
    `text`: a last column of text per label (what a composition needs)."""
    seeds = seeds_by_label(records)
    rows = []
    for label in model_order(records):
        group = sorted((seed for name, seed in cells if name == label), key=_seed_order)
        tail = [text.get(label, "")] if text is not None else []
        rows += [[row_name(label, seed, seeds), *map(_cell, cells[(label, seed)]), *tail] for seed in group]
        if len(group) > 1:
            per_column = zip(*(cells[(label, seed)] for seed in group))
            rows.append([mean_row_name(label, len(group)),
                         *(_seeds_mean_std([c["value"] for c in column if c and c.get("value") is not None],
                                           len(group)) for column in per_column), *tail])
    return rows


def _seeds_mean_std(values: list[float], n_seeds: int) -> str:
    """_mean_std over the seeds that have a value, saying how many when some have none (a
    retention whose expert did not move the score), since the row's name counts every seed."""
    cell = _mean_std(values)
    return cell if len(values) in (0, n_seeds) else f"{cell} ({len(values)} of {n_seeds} seeds)"


def needs_text(records: list[dict]) -> dict[str, str] | None:
    """What each composed model used beyond the experts' weights (compose.Needs.summary), or None
    when no record says (result files written before compositions declared it)."""
    needs = {r["model"]["label"]: r["model"]["needs"] for r in records if is_composed(r) and r["model"].get("needs")}
    return needs or None


# ---------------------------------------------------------------- the score table

def markdown_table(records: list[dict]) -> str:
    shown = columns(records)
    values = {(r["model"]["label"], seed_of(r), r["task"], name): value
              for r in records for name, value in r["metrics"].items()}
    errors = stored_errors(records)
    cells = {}
    for record in records:
        key = (record["model"]["label"], seed_of(record))
        cells[key] = [values.get((*key, task.name, metric.name)) for task, metric in shown]
        if errors:
            cells[key].append({"value": errors[key]} if key in errors else None)
    needs = needs_text(records)
    header = ["model", *(metric.title for _, metric in shown)] + (["stored ΔW error"] if errors else []) + (
        ["needs"] if needs else [])
    rows = seeded_rows(cells, records, needs)
    notes = ["Brackets: 95% intervals (Wilson for accuracies, bootstrap for F1 and NLL)."]
    if needs:
        notes.append("needs: what a composed model used beyond the experts' weights (validation examples per "
                     "task, the tasks' training prompts, gradients or forward passes while building, a base "
                     "pass over each test prompt to route it, the task label of each test example).")
    if errors:
        notes.append("stored ΔW error: a compressed merge's relative Frobenius error of its stored update "
                     "against the method's exact update (max over modules); – = stored exactly.")
    notes += [note for note in [environment_note(records)] if note]
    notes += [sample_note(task, [r for r in records if r["task"] == task.name]) for task in table_tasks(records)]
    return "\n".join(_markdown(header, rows)) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"


def sample_note(task, of_task: list[dict]) -> str:
    """The task's evaluation sample, and each metric that some rows were scored on fewer examples
    of: models generate only the first n_generate, while baselines answer every example."""
    record = next((r for r in of_task if r["model"].get("kind") != "baseline"), of_task[0])
    partial = []
    for metric in task.report_metrics:
        sizes = {}  # "models" / "baselines" -> how many examples the metric was computed on
        for r in of_task:
            if metric.name in r["metrics"]:
                sizes.setdefault("baselines" if r["model"].get("kind") == "baseline" else "models",
                                 r["metrics"][metric.name]["n"])
        if any(n != record["n"] for n in sizes.values()):
            partial.append(f"{metric.title} " + ", ".join(
                f"on {'all ' + str(n) if n == record['n'] else 'the first ' + str(n)}"
                + (f" for {kind}" if len(sizes) > 1 else "") for kind, n in sizes.items()))
    return (f"{task.name}: {record['n']} {record['split']} examples"
            + (f" ({'; '.join(partial)})" if partial else "") + f"; chance {record['chance']:.2f}")


def describe_environment(environment: dict) -> str:
    """One line for a models.environment record."""
    if not environment:
        return "an unrecorded environment (results written before environments were recorded)"
    code = ", ".join(f"{name} {environment.get(name)}" for name in ("loracombench", "torch", "transformers", "peft"))
    if "gpu" in environment:
        where = f"{environment['device']} ({environment['gpu']}, CUDA {environment['cuda']})"
    else:
        where = (f"{environment['device']} ({environment.get('cpu_capability')} kernels, "
                 f"{environment.get('torch_threads')} threads)")
    return f"{code} on {where}"


def environment_note(records: list[dict]) -> str | None:
    """What computed the models' results (baselines record their own libraries). Several
    environments are each listed with their count: kernels for another CPU or GPU change the
    last bits of a score, and a mixed table should say so."""
    counts = Counter(describe_environment(record.get("environment") or {})
                     for record in records if record["model"].get("kind") != "baseline")
    if len(counts) <= 1:
        return next((f"computed with {line}." for line in counts), None)
    return ("computed in several environments, whose kernels can differ in the last bits: "
            + "; ".join(f"{line} ({n} result{'s' if n > 1 else ''})" for line, n in counts.items()) + ".")


# ---------------------------------------------------------------- paired outputs

def _outputs(metric, rows: dict[int, dict]) -> dict[int, object]:
    """Per-example output that the metric's paired comparison reads, by example index."""
    field = "prediction" if metric.paired == "macro_f1" else metric.field
    return {index: row[field] for index, row in rows.items() if row.get(field) is not None}


def paired_outputs(metric, *prediction_sets: dict[int, dict]) -> tuple[list, list | None]:
    """The metric's outputs of each model on the examples all of them answered, and the gold
    labels for macro-F1. Rows are matched by their "index"; a mismatched gold means the
    predictions are not of the same examples."""
    outputs = [_outputs(metric, rows) for rows in prediction_sets]
    shared = sorted(set.intersection(*(set(o) for o in outputs)))
    for index in shared:
        golds = {str(rows[index].get("gold")) for rows in prediction_sets}
        if len(golds) > 1:
            raise ValueError(f"example {index} has different gold answers across models ({', '.join(sorted(golds))}):"
                             " not the same examples, or scored by different versions (start a fresh --out)")
    gold = [prediction_sets[0][i]["gold"] for i in shared] if metric.paired == "macro_f1" else None
    return [[o[i] for i in shared] for o in outputs], gold


def load_predictions(run_dir: Path, records: list[dict]) -> dict[tuple, dict[int, dict]]:
    """Predictions by (label, seed, task), then by example index, for the models paired statistics
    involve (base, experts, composed models): eval/<slug>/<task>/predictions.jsonl."""
    loaded = {}
    for record in records:
        model = record["model"]
        if model.get("kind") == "baseline":
            continue
        if not model.get("slug"):
            raise ValueError(f"result of {model['label']!r} on {record['task']} has no model slug: "
                             "cannot find its predictions.jsonl")
        rows = metrics.read_predictions(run_dir / "eval" / model["slug"] / record["task"])
        loaded[(model["label"], seed_of(record), record["task"])] = {row["index"]: row for row in rows}
    return loaded


def _key(record: dict) -> tuple:
    return record["model"]["label"], seed_of(record), record["task"]


def _same_examples(first: dict, second: dict) -> None:
    """Predictions are paired by their index in the sample, and the sample is drawn by (split, n,
    seed): all three must agree, or index i names two different examples."""
    def sample(record: dict) -> str:
        return f"{record['split']}/{record['n']} (sample seed {record.get('seed')})"

    if sample(first) != sample(second):
        raise ValueError(f"cannot pair {first['model']['label']!r} and {second['model']['label']!r} on "
                         f"{first['task']}: evaluated on {sample(first)} and {sample(second)} examples")
    # The same examples under another prompt or scoring would pair as if the models differed.
    versions = [record.get("task_version") for record in (first, second)]
    if None not in versions and versions[0] != versions[1]:
        raise ValueError(f"cannot pair {first['model']['label']!r} and {second['model']['label']!r} on "
                         f"{first['task']}: scored by two versions of the task's prompts and scoring "
                         f"({', '.join(stable_hash(v)[:12] for v in versions)}); rerun `loracombench run` "
                         f"into this folder to score both with today's")


# ---------------------------------------------------------------- paired comparisons

def comparators(record: dict, records: list[dict], compare_with: tuple[str, ...] = ()) -> list[dict]:
    """The average and every expert of the same seed and task, then the models named in the run's
    `compare_with` (by merge or composition label); never the record itself."""
    same = [r for r in records if r["task"] == record["task"] and seed_of(r) == seed_of(record) and r is not record]
    average = [r for r in same if r["model"]["label"] == AVERAGE_LABEL]
    experts = sorted((r for r in same if r["model"].get("kind") == "expert"), key=lambda r: r["model"]["label"])
    named = [r for name in compare_with for r in same
             if r["model"]["label"] == metrics.model_label(name, r["model"].get("kind", ""))
             and r["model"]["label"] != AVERAGE_LABEL]
    return average + experts + named


def paired_comparisons(records: list[dict], predictions: dict, compare_with: tuple[str, ...] = ()) -> list[dict]:
    """model − comparator for every composed model, comparator and declared metric, with the
    test's p and its Holm adjustment within (task, metric, comparator, seed)."""
    results = []
    for record in filter(is_composed, records):
        task = get_task(record["task"])
        for other in comparators(record, records, compare_with):
            _same_examples(record, other)
            for metric in task.report_metrics:
                if metric.name not in record["metrics"] or metric.name not in other["metrics"]:
                    continue
                (first, second), gold = paired_outputs(metric, predictions[_key(record)], predictions[_key(other)])
                if not first:
                    continue
                compared = stats.compare_paired(metric.paired, first, second, gold=gold, n_classes=metric.n_classes)
                results.append({"label": record["model"]["label"], "kind": record["model"].get("kind", ""),
                                "seed": seed_of(record), "task": task.name, "split": record["split"],
                                "metric": metric, "comparator": other["model"]["label"], **compared})
    families: dict[tuple, list[dict]] = {}
    for row in results:
        families.setdefault((row["task"], row["metric"].name, row["comparator"], row["seed"]), []).append(row)
    for family in families.values():
        for row, adjusted in zip(family, stats.holm([row["p"] for row in family])):
            row["p_holm"] = adjusted
            row["survives_holm"] = adjusted is not None and adjusted < ALPHA
    return results


def _verdict(row: dict) -> str:
    if not row["survives_holm"]:
        return ""
    better = (row["value"] > 0) == row["metric"].higher_is_better
    return "✓ better" if better else "✓ worse"


def comparison_table(comparisons: list[dict], records: list[dict]) -> str:
    """One table per task and metric (its test in the heading), comparator by comparator."""
    seeds = seeds_by_label(records)
    order = {label: i for i, label in enumerate(model_order(records))}
    header = ["model", "vs", "n", "difference [95% CI]", "p", "Holm p", f"Holm {ALPHA}"]
    parts = []
    for task, metric in columns(records):
        shown = sorted((row for row in comparisons if row["task"] == task.name and row["metric"] == metric),
                       key=lambda row: (row["comparator"] != AVERAGE_LABEL, row["comparator"],
                                        _seed_order(row["seed"]), order[row["label"]]))
        if shown:
            rows = [[row_name(row["label"], row["seed"], seeds), row["comparator"], str(row["n"]), _signed_cell(row),
                     _p(row["p"]), _p(row["p_holm"]), _verdict(row)] for row in shown]
            parts.append(f"### {metric.title} ({shown[0]['test']})\n\n" + "\n".join(_markdown(header, rows)) + "\n")
    notes = ["difference: model − comparator on the examples both answered (matched by index), with a "
             "paired-bootstrap 95% interval; for a ↓ metric a negative difference is better.",
             "tests: exact McNemar for 0/1 outcomes, paired permutation test for means and macro-F1 "
             f"({stats.PERMUTATIONS:,} random swaps unless all 2^n are fewer; a p of "
             f"{1 / (stats.PERMUTATIONS + 1):.4f} is then the least they can give: a conservative p, "
             "the exact one may be smaller).",
             f"Holm p: adjusted across the composed models{' of a seed' if several_seeds(records) else ''}, "
             f"per task, metric and comparator; ✓ where it stays below {ALPHA}."]
    return "\n".join(f"- {note}" for note in notes) + "\n\n" + "\n".join(parts)


# ---------------------------------------------------------------- retention

def retention_rows(records: list[dict], predictions: dict) -> list[dict]:
    """Retention of every composed model on every task whose base and own expert (same seed) exist."""
    results = []
    for record in filter(is_composed, records):
        task = get_task(record["task"])
        of_task = [r for r in records if r["task"] == task.name]
        base = next((r for r in of_task if r["model"].get("kind") == "base"), None)
        expert = next((r for r in of_task if expert_task(r["model"]) == task.name
                       and seed_of(r) == seed_of(record)), None)
        if base is None or expert is None:
            continue
        metric = task.report_metric(task.retention_metric)
        if any(metric.name not in r["metrics"] for r in (record, base, expert)):
            continue
        for other in (base, expert):
            _same_examples(record, other)
        (model_out, base_out, expert_out), gold = paired_outputs(
            metric, predictions[_key(record)], predictions[_key(base)], predictions[_key(expert)])
        if not model_out:
            continue
        scores = [stats.score_of(metric.paired, outputs, gold=gold, n_classes=metric.n_classes)
                  for outputs in (model_out, base_out, expert_out)]
        results.append({"label": record["model"]["label"], "kind": record["model"].get("kind", ""),
                        "seed": seed_of(record), "task": task.name, "split": record["split"], "metric": metric,
                        "comparator": expert["model"]["label"],
                        **stats.retention(*scores, len(model_out), higher_is_better=metric.higher_is_better)})
    return results


def retention_table(retention: list[dict], records: list[dict]) -> str:
    tasks = [task for task in table_tasks(records) if any(r["task"] == task.name for r in retention)]
    by_task = {(r["label"], r["seed"], r["task"]): r for r in retention}
    cells = {(r["label"], r["seed"]): [by_task.get((r["label"], r["seed"], task.name)) for task in tasks]
             for r in retention}
    header = ["model", *(f"{task.name} retention ({task.retention_metric})" for task in tasks)]
    rows = seeded_rows(cells, records)
    same_seed = " of the same seed" if several_seeds(records) else ""
    notes = [f"retention = (model − base) / (expert − base) against the task's own expert{same_seed}; "
             "for NLL the gains are base − model and base − expert. 1: the expert's whole gain, 0: none.",
             "Brackets: paired-bootstrap 95% intervals (examples resampled jointly for model, base and expert); "
             "– where the expert does not improve on the base."]
    if any(r.get("undefined_resamples") for r in retention):
        notes.append(f"{PARTIAL_INTERVAL}: in some resamples the expert does not improve on the base, so retention is "
                     "undefined there; the interval is over the others (how many: results.csv's interval column).")
    return "\n".join(_markdown(header, rows)) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"


# ---------------------------------------------------------------- results.csv

def long_rows(records: list[dict], comparisons: list[dict] = (), retention: list[dict] = ()) -> list[dict]:
    rows = []
    for record in records:
        model = record["model"]
        for name, value in record["metrics"].items():
            rows.append({"statistic": "score", "model": model["label"], "kind": model.get("kind", ""),
                         "seed": seed_of(record), "task": record["task"], "split": record["split"], "metric": name,
                         **{k: value[k] for k in ("value", "ci_low", "ci_high", "n", "interval")},
                         "relative_error": relative_error(record)})
    rows += _seed_means(rows, "score")
    for row in comparisons:
        rows.append({**_interval_fields(row), "statistic": "difference", "test": row["test"], "p": row["p"],
                     "p_holm": row["p_holm"], "survives_holm": row["survives_holm"]})
    retained = [{**_interval_fields(row), "statistic": "retention"} for row in retention]
    return rows + retained + _seed_means(retained, "retention")


def _interval_fields(row: dict) -> dict:
    return {"model": row["label"], "kind": row["kind"], "seed": row["seed"], "task": row["task"],
            "split": row["split"], "metric": row["metric"].name, "comparator": row["comparator"],
            **{k: row[k] for k in ("value", "ci_low", "ci_high", "n", "interval")}}


def _seed_means(rows: list[dict], statistic: str) -> list[dict]:
    """Mean and sample std over seeds of every (model, task, metric) that has several seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["kind"], row["task"], row["split"], row["metric"]), []).append(row)
    means = []
    for (model, kind, task, split, metric), group in groups.items():
        values = [row["value"] for row in group if row["value"] is not None]
        if len({row["seed"] for row in group}) < 2 or not values:
            continue
        means.append({"statistic": f"{statistic} mean over seeds", "model": model, "kind": kind, "task": task,
                      "split": split, "metric": metric, "comparator": group[0].get("comparator"),
                      "value": float(np.mean(values)),
                      "std": float(np.std(values, ddof=1)) if len(values) > 1 else None, "n_seeds": len(values)})
    return means


def write_csv(rows: list[dict], path: Path) -> None:
    buffer = stdio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, restval="")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    io.write_text(path, buffer.getvalue())


# ---------------------------------------------------------------- plot

def plot(records: list[dict], path: Path) -> None:
    """One panel per task's primary and retention metric: bars with 95% intervals, rows in table order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(task, metric) for task, metric in columns(records)
              if metric.name in (task.primary_metric, task.retention_metric)]
    seeds = seeds_by_label(records)
    rows = [(label, seed) for label in model_order(records) for seed in seeds[label]]
    errors = stored_errors(records)
    # A compressed merge is an approximation of its method: its label carries its error, as in the table.
    names = [row_name(label, seed, seeds) + (f" (ΔW error {errors[(label, seed)]:.2f})" if (label, seed) in errors
                                             else "") for label, seed in rows]
    index = {(r["model"]["label"], seed_of(r), r["task"]): r for r in records}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 0.38 * len(rows) + 2.2), squeeze=False)
    colours = {"base": "#7f7f7f", "expert": "#1f77b4", "merge": "#d62728", "baseline": "#bcbd22"}
    for ax, (task, metric) in zip(axes[0], panels):
        shown = [(i, index[(label, seed, task.name)]) for i, (label, seed) in enumerate(rows)
                 if (label, seed, task.name) in index and metric.name in index[(label, seed, task.name)]["metrics"]]
        for i, record in shown:
            value = record["metrics"][metric.name]
            ax.barh(i, value["value"], color=colours.get(record["model"].get("kind"), "#444"),
                    xerr=[[max(0.0, value["value"] - value["ci_low"])], [max(0.0, value["ci_high"] - value["value"])]],
                    capsize=3)
        chance = next((r["chance"] for _, r in shown), None)
        if metric.higher_is_better and chance:
            ax.axvline(chance, color="black", linestyle=":", linewidth=1, label="chance")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_yticks(range(len(rows)), names if ax is axes[0][0] else [""] * len(rows))
        ax.set_ylim(len(rows) - 0.5, -0.5)  # the same rows in every panel, first model on top
        ax.set_title(metric.title)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("LoRA composition: every model on every task (95% intervals)")
    fig.tight_layout()
    with io.atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- everything

def report_markdown(records: list[dict], comparisons: list[dict], retention: list[dict]) -> str:
    parts = ["## Scores\n\n" + markdown_table(records)]
    if comparisons:
        parts.append("## Paired comparisons\n\n" + comparison_table(comparisons, records))
    if retention:
        parts.append("## Retention\n\n" + retention_table(retention, records))
    return "\n".join(parts)


REPORT_FILES = ("results.csv", "results.md", "results.png")


def _refuse_to_replace_foreign_files(run_dir: Path) -> None:
    """A run's results.* are the run's own. In a folder that is no run (result folders gathered by
    hand), they are replaced only when they are an earlier report's: the user's own files of
    those names are never overwritten."""
    if (run_dir / "config.json").is_file() or (run_dir / CURRENT_RESULTS).is_file():
        return

    def earlier_report(path: Path) -> bool:
        if not path.is_file():
            return False
        if path.suffix == ".png":  # matplotlib names itself in the PNG's metadata
            head = path.read_bytes()[:4096]
            return head.startswith(b"\x89PNG") and b"Matplotlib" in head
        text = path.read_text(encoding="utf-8", errors="replace")
        return text.startswith("statistic,model,") if path.suffix == ".csv" else "## Scores\n" in text

    foreign = [name for name in REPORT_FILES if (run_dir / name).exists() and not earlier_report(run_dir / name)]
    if foreign:
        raise ValueError(f"{run_dir} is not a run folder and holds {', '.join(sorted(foreign))} that no report "
                         f"wrote; move them away, or report into a copy of the result folders")


def run_compare_with(run_dir: Path) -> tuple[str, ...]:
    """The run config's `compare_with` (config.json), or none for a folder without one."""
    config = run_dir / "config.json"
    return tuple(io.read_json(config).get("compare_with", [])) if config.is_file() else ()


def build_report(run_dir: str | Path, partial: bool = False) -> Path:
    """results.csv, .md and .png of a finished run; of an unfinished one only if `partial`, and
    then its Markdown says so first."""
    run_dir = Path(run_dir)
    records = collect(run_dir, partial)
    _refuse_to_replace_foreign_files(run_dir)
    predictions = load_predictions(run_dir, records)
    comparisons = paired_comparisons(records, predictions, run_compare_with(run_dir))
    retention = retention_rows(records, predictions)
    heading = (f"**Partial: the run in this folder has not finished.** These are the {len(records)} results "
               f"it had written; its config may hold more models, seeds and baselines.\n\n"
               if _unfinished(run_dir) else "")
    write_csv(long_rows(records, comparisons, retention), run_dir / "results.csv")
    io.write_text(run_dir / "results.md",
                  heading + report_markdown(records, comparisons, retention) + stale_note(run_dir))
    plot(records, run_dir / "results.png")
    return run_dir
