"""Task registry: a dict of task instances and one lookup that names the valid choices."""

from __future__ import annotations

from .ag_news import AgNews
from .base import ReportMetric, Task
from .gsm8k import Gsm8k

TASKS: dict[str, Task] = {}


def register(task: Task) -> None:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    if not getattr(task, "report_metrics", ()):
        raise ValueError(f"task {task.name!r} declares no report_metrics: the report would show nothing for it")
    task.report_metric(getattr(task, "retention_metric", None))  # one the report does not show is a typo
    TASKS[task.name] = task


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}") from None


register(AgNews())
register(Gsm8k())

__all__ = ["TASKS", "ReportMetric", "Task", "get_task", "register"]
