"""Loading task splits from a local mirror (Hugging Face schema, JSONL) or from the hub.

Every row is validated before anything is computed, so a bad file stops the run with one
error that names the file and line, and no output is written.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from pathlib import Path

from .tasks import Task, get_task

DATA_DIR_ENV = "LORACOMBENCH_DATA_DIR"


class DataError(ValueError):
    """Unusable data: a bad row, a missing file or split, an impossible sample size."""


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The mirror folder to use: the argument, else $LORACOMBENCH_DATA_DIR, else None (the hub)."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise DataError(f"data folder {path} does not exist")
    return path


def data_source(data_dir: str | Path | None) -> str:
    """Where rows come from, as results record it: the mirror's absolute path, else "hub"."""
    folder = resolve_data_dir(data_dir)
    return str(folder.resolve()) if folder else "hub"


def split_file(task: Task, split: str, data_dir: Path) -> Path:
    return data_dir / task.name / f"{split}.jsonl"


def read_jsonl_rows(path: Path, task: Task) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected the {task.name} split in the mirror)")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_number}: invalid JSON ({err.msg})") from None
            problem = task.check_row(row) if isinstance(row, dict) else "a row must be a JSON object"
            if problem:
                raise DataError(f"{path}:{line_number}: {problem}")
            rows.append({field: row[field] for field in task.fields})
    if not rows:
        raise DataError(f"{path}: the split is empty")
    return rows


def check_rows(task: Task, rows: list, where: str) -> None:
    """Validate rows already in memory (hub data, rows passed to the library): no I/O."""
    if not rows:
        raise DataError(f"{where}: no rows (the split is empty)")
    for index, row in enumerate(rows):
        problem = task.check_row(row) if isinstance(row, dict) else "a row must be a JSON object"
        if problem:
            raise DataError(f"{where} row {index}: {problem}")


def hub_rows(task: Task, split: str) -> list[dict]:
    import datasets

    if split not in task.hub_splits:
        raise DataError(
            f"the hub copy of {task.name} has no {split!r} split (it has {', '.join(task.hub_splits)})"
        )
    try:
        dataset = datasets.load_dataset(task.hub_path, task.hub_config, split=split)
    except Exception as err:  # network, auth, missing dataset: all end the same way for the user
        raise DataError(
            f"could not load {task.hub_path} from the Hugging Face hub ({type(err).__name__}: {err}). "
            f"Offline, point --data-dir or ${DATA_DIR_ENV} at a local mirror."
        ) from err
    rows = list(dataset)
    check_rows(task, rows, f"{task.hub_path} [{split}]")
    return [{field: row[field] for field in task.fields} for row in rows]


def load_split(task: Task | str, split: str, data_dir: str | Path | None = None) -> list[dict]:
    """All validated rows of one split, in file order."""
    task = get_task(task) if isinstance(task, str) else task
    folder = resolve_data_dir(data_dir)
    if folder is None:
        return hub_rows(task, split)
    if split not in task.splits:
        raise DataError(f"{task.name} has no {split!r} split (valid: {', '.join(task.splits)})")
    return read_jsonl_rows(split_file(task, split, folder), task)


def subsample(rows: list[dict], n: int | None, seed: int, task: Task | None = None) -> list[dict]:
    """A seeded, deterministic sample of n rows (all rows if n is None or covers the split).

    When the task has strata (AG News labels) the sample is stratified: each class gets its
    proportional share, rounded by largest remainder, so 200 of a balanced split is 50 per class."""
    if n is not None and n <= 0:
        raise DataError(f"sample size must be positive, got {n}")
    if n is None or n >= len(rows):
        return list(rows)
    rng = random.Random(seed)
    strata: dict[object, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        strata[task.stratum(row) if task else None].append(index)
    quotas = _largest_remainder({key: len(ids) for key, ids in strata.items()}, n)
    chosen = []
    for key in sorted(strata, key=repr):
        chosen += rng.sample(strata[key], quotas[key])
    rng.shuffle(chosen)
    return [rows[i] for i in chosen]


def _largest_remainder(sizes: dict, n: int) -> dict:
    total = sum(sizes.values())
    exact = {key: n * size / total for key, size in sizes.items()}
    quotas = {key: int(value) for key, value in exact.items()}
    by_remainder = sorted(exact, key=lambda key: (quotas[key] - exact[key], repr(key)))
    for key in by_remainder[: n - sum(quotas.values())]:
        quotas[key] += 1
    return quotas


def load_sample(task: Task | str, split: str, n: int | None, seed: int, data_dir=None,
                what: str = "the sample size") -> list[dict]:
    """A seeded sample of n rows of a split; n larger than the split is an error (None: all rows).
    `what` names the flag or config key that gave n, for the error message."""
    task = get_task(task) if isinstance(task, str) else task
    rows = load_split(task, split, data_dir)
    if n is not None and n <= 0:
        raise DataError(f"{what} must be a positive number of rows, got {n}")
    if n is not None and n > len(rows):
        raise DataError(f"{what}={n} asks for more rows than the {task.name} {split} split has ({len(rows)}); "
                        f"ask for at most {len(rows)}, or for all rows (omit it, or null in a config)")
    return subsample(rows, n, seed, task)


def validation_sample(task: Task | str, n: int | None, seed: int, data_dir, training_rows: list[dict],
                      what: str = "the sample size") -> list[dict]:
    """Rows for choosing settings, never test rows: the task's validation split where its source
    has one, else rows of its train split that are outside the training sample."""
    task = get_task(task) if isinstance(task, str) else task
    splits = task.splits if resolve_data_dir(data_dir) else task.hub_splits
    if "validation" in splits:
        return load_sample(task, "validation", n, seed, data_dir, what=what)
    used = {row_key(row) for row in training_rows}
    held_out = [row for row in load_split(task, "train", data_dir) if row_key(row) not in used]
    if not held_out:
        raise DataError(f"{task.name}: the training sample uses the whole train split; no rows are left for validation")
    if n is not None and n > len(held_out):
        raise DataError(f"{what}={n} asks for more {task.name} validation rows than the train split has outside the "
                        f"training sample ({len(held_out)}); ask for at most {len(held_out)}, or train on fewer rows")
    return subsample(held_out, n, seed, task)


def row_key(row: dict) -> str:
    """A row's identity, to tell whether two samples share it."""
    return json.dumps(row, sort_keys=True)


def describe(data_dir: str | Path | None = None) -> list[dict]:
    """One entry per task and split: size and source, for `loracombench data`."""
    folder = resolve_data_dir(data_dir)
    from .tasks import TASKS

    entries = []
    for task in TASKS.values():
        for split in task.splits if folder else task.hub_splits:
            if folder is None:
                entries.append({"task": task.name, "split": split, "rows": None,
                                "source": f"hub:{task.hub_path}" + (f" ({task.hub_config})" if task.hub_config else "")})
                continue
            path = split_file(task, split, folder)
            rows = len(read_jsonl_rows(path, task)) if path.is_file() else None
            entries.append({"task": task.name, "split": split, "rows": rows, "source": str(path)})
    return entries
