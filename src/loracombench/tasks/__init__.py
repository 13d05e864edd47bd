"""Task registry: a dict of task instances and one lookup that names the valid choices."""

from __future__ import annotations

import contextlib
from typing import Iterator

from .ag_news import AgNews
from .base import Baseline, ReportMetric, Task
from .gsm8k import Gsm8k

TASKS: dict[str, Task] = {}


def register(task: Task) -> None:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    if not getattr(task, "report_metrics", ()):
        raise ValueError(f"task {task.name!r} declares no report_metrics: the report would show nothing for it")
    task.report_metric(getattr(task, "retention_metric", None))  # one the report does not show is a typo
    names = [baseline.name for baseline in task.baselines()]
    if len(set(names)) != len(names):
        raise ValueError(f"task {task.name!r}: its baselines' names repeat ({', '.join(names)}); "
                         "each names a result folder")
    unknown = [split for split in task.eda_splits if split not in task.splits]
    if unknown:
        raise ValueError(f"task {task.name!r}: eda_splits {unknown} are not among its splits "
                         f"({', '.join(task.splits)})")
    TASKS[task.name] = task


def unregister(name: str) -> Task:
    """Remove a registered task and return it."""
    task = get_task(name)
    del TASKS[name]
    return task


@contextlib.contextmanager
def registered(task: Task) -> Iterator[Task]:
    """The task registered for the with-block only (a test's or a plug-in's task), then removed."""
    register(task)
    try:
        yield task
    finally:
        unregister(task.name)


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}") from None


register(AgNews())
register(Gsm8k())

__all__ = ["TASKS", "Baseline", "ReportMetric", "Task", "get_task", "register", "registered", "unregister"]
