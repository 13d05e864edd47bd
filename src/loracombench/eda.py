"""Exploratory data analysis of the benchmark's tasks: statistics (JSON) and labelled plots.

Each task declares its own statistics, plots and printed summary (Task.eda_stats, eda_plots,
eda_summary, and the splits they need, eda_splits); every task also gets the token lengths of
its prompts and targets here. Three layers, so that the CLI, the notebook and the tests share
one implementation:

- `compute_stats(task_name, splits, tokenizer=None)` is pure: rows in, a JSON-ready dict out.
- `plot_all(stats, splits, out_dir)` draws one task's figures (PNG, written atomically).
- `run_eda(task_names, data_dir, out_dir, tokenizer=None)` loads, computes, plots and writes
  `eda_stats.json` last, so a present stats file marks a finished run.

Token lengths use the tokenizer the caller passes (the base model's in the CLI) without special
tokens. Every input problem is raised as DataError/ValueError before anything is written.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np

from . import io
from .data import DataError, check_rows, load_split, resolve_data_dir
from .tasks import Task, get_task
from .tasks.eda_tools import WORD_UNIT, figure, histogram, integer_bins, save_figure, split_colour, summarize

SCHEMA = "loracombench.eda/1"
STATS_FILE = "eda_stats.json"


def check_splits(task: Task, splits: dict[str, list[dict]]) -> None:
    """Raise DataError unless the task's required splits are present, non-empty and valid."""
    missing = [name for name in task.eda_splits if name not in splits]
    if missing:
        raise DataError(f"{task.name}: EDA needs the split(s) {', '.join(missing)} "
                        f"(got: {', '.join(splits) or 'none'})")
    if not splits:
        raise DataError(f"{task.name}: EDA needs at least one split")
    for name, rows in splits.items():
        check_rows(task, rows, f"{task.name} [{name}]")


# --------------------------------------------------------------------------- tokens

def token_counts(tokenizer, texts: list[str], batch_size: int = 1000) -> list[int]:
    """Token counts under an HF tokenizer, without special tokens (BOS/EOS)."""
    counts: list[int] = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], add_special_tokens=False)["input_ids"]
        counts.extend(len(ids) for ids in encoded)
    return counts


def token_stats(task: Task, splits: dict[str, list[dict]], tokenizer) -> dict:
    """Percentiles of prompt, target and prompt+target token counts, per split and pooled.

    prompt+target is tokenized as one string (task.prompt(row) + task.target(row))."""
    per_split, pooled = {}, []
    for name, rows in splits.items():
        prompts = [task.prompt(r) for r in rows]
        targets = [task.target(r) for r in rows]
        both = token_counts(tokenizer, [p + t for p, t in zip(prompts, targets)])
        pooled.extend(both)
        per_split[name] = {"prompt": summarize(token_counts(tokenizer, prompts)),
                           "target": summarize(token_counts(tokenizer, targets)),
                           "prompt_plus_target": summarize(both),
                           "prompt_plus_target_histogram": histogram(both)}
    return {
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "special_tokens": "not counted (add_special_tokens=False)",
        "splits": per_split,
        "all_splits": {"prompt_plus_target": summarize(pooled)},
    }


# --------------------------------------------------------------------------- entry points

def compute_stats(task_name: str, splits: dict[str, list[dict]], tokenizer=None) -> dict:
    """All statistics of one task, as a JSON-ready dict. tokenizer=None skips token lengths."""
    task = get_task(task_name)
    check_splits(task, splits)
    stats = {"task": task.name, "description": task.description, "length_unit": WORD_UNIT}
    stats.update(task.eda_stats(splits))
    stats["shared_prompts"] = shared_prompts(task, splits)
    stats["token_lengths"] = token_stats(task, splits, tokenizer) if tokenizer is not None else None
    return stats


def shared_prompts(task: Task, splits: dict[str, list[dict]]) -> dict[str, dict[str, int]]:
    """For each pair of splits, how many prompts of the second also stand in the first, as the
    model reads them and with whitespace and case ignored: a test example whose prompt a model
    trained on measures memory, not the task."""
    def loose(text: str) -> str:
        return " ".join(text.split()).lower()

    prompts = {split: [task.prompt(row) for row in rows] for split, rows in splits.items()}
    shared = {}
    for first, second in itertools.combinations(prompts, 2):
        exact, relaxed = set(prompts[first]), {loose(p) for p in prompts[first]}
        shared[f"{first}/{second}"] = {"same_prompt": sum(p in exact for p in prompts[second]),
                                       "same_ignoring_whitespace_and_case":
                                           sum(loose(p) in relaxed for p in prompts[second])}
    return shared


def load_task_splits(task_names, data_dir=None) -> dict[str, dict[str, list[dict]]]:
    """Every split of each task from the mirror (or the hub's splits when no mirror is set)."""
    folder = resolve_data_dir(data_dir)
    loaded = {}
    for name in dict.fromkeys(task_names):  # keeps order, drops repeats
        task = get_task(name)
        split_names = task.splits if folder is not None else task.hub_splits
        loaded[task.name] = {split: load_split(task, split, folder) for split in split_names}
    if not loaded:
        raise ValueError("no task given")
    return loaded


def write_eda(loaded: dict[str, dict[str, list[dict]]], out_dir, tokenizer=None,
              source: str | None = None) -> Path:
    """Compute every task's statistics, then draw the plots, then write eda_stats.json last."""
    out_dir = Path(out_dir)
    started = time.time()
    all_stats = {name: compute_stats(name, splits, tokenizer) for name, splits in loaded.items()}
    plots = []
    for name, stats in all_stats.items():
        plots += [p.name for p in plot_all(stats, loaded[name], out_dir)]
    record = {"schema": SCHEMA, "data": source, "tasks": all_stats, "plots": plots,
              "elapsed_s": round(time.time() - started, 2),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return io.write_json(out_dir / STATS_FILE, record)


def run_eda(task_names, data_dir, out_dir, tokenizer=None) -> Path:
    """Load, compute, plot and write; returns the path of eda_stats.json."""
    loaded = load_task_splits(task_names, data_dir)
    folder = resolve_data_dir(data_dir)
    return write_eda(loaded, out_dir, tokenizer, source=str(folder) if folder else "hub")


def summary_lines(stats: dict) -> list[str]:
    """What `loracombench eda` prints about one task: its own summary, then its token lengths."""
    lines = get_task(stats["task"]).eda_summary(stats)
    if stats.get("shared_prompts"):
        lines.append(f"{stats['task']}: prompts shared between splits: " + ", ".join(
            f"{pair} {n['same_prompt']} ({n['same_ignoring_whitespace_and_case']} ignoring whitespace and case)"
            for pair, n in stats["shared_prompts"].items()))
    if stats.get("token_lengths"):
        pooled = stats["token_lengths"]["all_splits"]["prompt_plus_target"]
        lines.append(f"{stats['task']}: prompt+target tokens p50 {pooled['p50']:.0f}, p95 {pooled['p95']:.0f}, "
                     f"p99 {pooled['p99']:.0f}, max {pooled['max']:.0f}")
    return lines


# --------------------------------------------------------------------------- plots

def plot_tokens(stats: dict, out_dir: Path) -> list[Path]:
    tokens = stats.get("token_lengths")
    if not tokens:
        return []
    task = get_task(stats["task"])
    fig, (ax,) = figure(size=(8, 4.6))
    hists = {name: (np.array([int(k) for k in s["prompt_plus_target_histogram"]]),
                    np.array(list(s["prompt_plus_target_histogram"].values())))
             for name, s in tokens["splits"].items()}
    bins = integer_bins(np.concatenate([values for values, _ in hists.values()]))
    for i, (name, (values, counts)) in enumerate(hists.items()):
        ax.hist(values, bins=bins, weights=counts, density=True, histtype="step",
                linewidth=1.5, color=split_colour(name, i), label=f"{name} (n={int(counts.sum()):,})")
    pooled = tokens["all_splits"]["prompt_plus_target"]
    for key, style in (("p50", ":"), ("p95", "--"), ("p99", "-."), ("max", "-")):
        ax.axvline(pooled[key], color="0.3", linestyle=style, linewidth=1,
                   label=f"{key} (all splits) = {pooled[key]:.0f}")
    ax.set_xlabel("prompt + target length (tokens, base-model tokenizer, no special tokens)")
    ax.set_ylabel("density")
    ax.set_title(f"{task.title}: token length of prompt + target")
    ax.legend(fontsize=8)
    return [save_figure(fig, out_dir / f"{task.name}_token_lengths.png")]


def plot_all(stats: dict, splits: dict[str, list[dict]], out_dir) -> list[Path]:
    """Draw one task's figures into out_dir: its own, then its token lengths; returns the PNG paths."""
    out_dir = Path(out_dir)
    return get_task(stats["task"]).eda_plots(stats, splits, out_dir) + plot_tokens(stats, out_dir)
