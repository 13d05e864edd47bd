"""Tables and plots built from result files alone (eval/<model>/<task>/metrics.json).

A run records which result folders are its current cells (current_results.json); the report
shows exactly those, and lists any other result folder under eval/ as stale, never as a row.
"""

from __future__ import annotations

import csv
import io as stdio
from pathlib import Path

from . import io, metrics

CURRENT_RESULTS = "current_results.json"
CURRENT_SCHEMA = "loracombench.current-results/1"
KIND_ORDER = {"base": 0, "expert": 1, "merge": 2, "baseline": 3}
# (task, metric, column title, higher is better)
COLUMNS = [
    ("ag_news", "accuracy", "AG News acc", True),
    ("ag_news", "macro_f1", "AG News macro-F1", True),
    ("gsm8k", "exact_match_flexible", "GSM8K EM (flexible)", True),
    ("gsm8k", "exact_match_strict", "GSM8K EM (strict)", True),
    ("gsm8k", "gold_nll", "GSM8K gold NLL ↓", False),
]


def write_current_results(run_dir: str | Path, folders: list[Path]) -> Path:
    """Record the result folders of the run's current cells (relative to the run folder)."""
    run_dir = Path(run_dir)
    names = [Path(f).relative_to(run_dir).as_posix() for f in folders]
    return io.write_json(run_dir / CURRENT_RESULTS, {"schema": CURRENT_SCHEMA, "results": names})


def _all_results(run_dir: Path) -> list[str]:
    return [f.parent.relative_to(run_dir).as_posix() for f in sorted(run_dir.glob("eval/*/*/metrics.json"))]


def current_results(run_dir: str | Path) -> list[str]:
    """The run's current result folders: those its manifest lists, else (an older run) every one."""
    run_dir = Path(run_dir)
    manifest = run_dir / CURRENT_RESULTS
    if not manifest.is_file():
        return _all_results(run_dir)
    recorded = io.read_json(manifest)
    if not isinstance(recorded, dict) or recorded.get("schema") != CURRENT_SCHEMA:
        raise ValueError(f"{manifest} is not a {CURRENT_SCHEMA} file; rerun `loracombench run` to rewrite it")
    return list(recorded["results"])


def stale_results(run_dir: str | Path) -> list[str]:
    """Result folders under eval/ that are not among the run's current cells."""
    current = set(current_results(run_dir))
    return [name for name in _all_results(Path(run_dir)) if name not in current]


def collect(run_dir: str | Path) -> list[dict]:
    """One record per current (model, task) result of the run folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: no such run folder")
    records = []
    for name in current_results(run_dir):
        if not (run_dir / name / "metrics.json").is_file():
            raise ValueError(f"{run_dir}/{CURRENT_RESULTS} lists {name}, but its metrics.json is missing; "
                             f"rerun `loracombench run` to recompute it")
        records.append(metrics.read_result(run_dir / name))
    if not records:
        raise ValueError(f"no results under {run_dir}/eval: run `loracombench run` first")
    return records


def stale_note(run_dir: str | Path) -> str:
    stale = stale_results(run_dir)
    if not stale:
        return ""
    return (f"\nNot shown: {len(stale)} stale result folder(s) under eval/ that are not cells of this run's "
            f"config (kept on disk, safe to delete): {', '.join(stale)}.\n")


def long_rows(records: list[dict]) -> list[dict]:
    rows = []
    for record in records:
        for name, value in record["metrics"].items():
            rows.append({"model": record["model"]["label"], "kind": record["model"].get("kind", ""),
                         "task": record["task"], "split": record["split"], "metric": name,
                         "value": value["value"], "ci_low": value["ci_low"], "ci_high": value["ci_high"],
                         "n": value["n"], "interval": value["interval"]})
    return rows


def model_order(records: list[dict]) -> list[str]:
    seen = {}
    for record in records:
        model = record["model"]
        seen.setdefault(model["label"], (KIND_ORDER.get(model.get("kind"), 9), model["label"]))
    return sorted(seen, key=seen.get)


def _cell(value: dict | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value['value']:.{digits}f} [{value['ci_low']:.{digits}f}, {value['ci_high']:.{digits}f}]"


def markdown_table(records: list[dict]) -> str:
    tasks = {r["task"] for r in records}
    columns = [c for c in COLUMNS if c[0] in tasks]
    index = {(r["model"]["label"], r["task"]): r["metrics"] for r in records}
    lines = ["| model | " + " | ".join(c[2] for c in columns) + " |",
             "| --- | " + " | ".join("---" for _ in columns) + " |"]
    for label in model_order(records):
        cells = [_cell(index.get((label, task), {}).get(metric)) for task, metric, _, _ in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    notes = ["Brackets: 95% intervals (Wilson for accuracies, bootstrap for F1 and NLL)."]
    for task in sorted(tasks):
        of_task = [r for r in records if r["task"] == task]
        record = next((r for r in of_task if r["model"].get("kind") != "baseline"), of_task[0])
        generated = record["metrics"].get("exact_match_flexible", {}).get("n")
        notes.append(f"{task}: {record['n']} {record['split']} examples"
                     + (f", the first {generated} answered by generation" if generated else "")
                     + f"; chance {record['chance']:.2f}")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    buffer = stdio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    io.write_text(path, buffer.getvalue())


def plot(records: list[dict], path: Path) -> None:
    """One panel per headline metric: bars with 95% intervals, models in table order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = {r["task"] for r in records}
    panels = [c for c in COLUMNS if c[0] in tasks and c[1] in ("accuracy", "exact_match_flexible", "gold_nll")]
    labels = model_order(records)
    index = {(r["model"]["label"], r["task"]): r for r in records}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 0.38 * len(labels) + 2.2), squeeze=False)
    colours = {"base": "#7f7f7f", "expert": "#1f77b4", "merge": "#d62728", "baseline": "#bcbd22"}
    for ax, (task, metric, title, higher) in zip(axes[0], panels):
        shown = [(i, index[(label, task)]) for i, label in enumerate(labels)
                 if (label, task) in index and metric in index[(label, task)]["metrics"]]
        for i, record in shown:
            value = record["metrics"][metric]
            ax.barh(i, value["value"], color=colours.get(record["model"].get("kind"), "#444"),
                    xerr=[[max(0.0, value["value"] - value["ci_low"])], [max(0.0, value["ci_high"] - value["value"])]],
                    capsize=3)
        chance = next((r["chance"] for _, r in shown), None)
        if higher and chance:
            ax.axvline(chance, color="black", linestyle=":", linewidth=1, label="chance")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels if ax is axes[0][0] else [""] * len(labels))
        ax.set_ylim(len(labels) - 0.5, -0.5)  # the same rows in every panel, first model on top
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("LoRA composition: every model on every task (95% intervals)")
    fig.tight_layout()
    with io.atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def build_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    records = collect(run_dir)
    write_csv(long_rows(records), run_dir / "results.csv")
    io.write_text(run_dir / "results.md", markdown_table(records) + stale_note(run_dir))
    plot(records, run_dir / "results.png")
    return run_dir
