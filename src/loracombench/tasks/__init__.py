"""Task registry: a dict of task instances and one lookup that names the valid choices."""

from __future__ import annotations

from .ag_news import AgNews
from .base import Task
from .gsm8k import Gsm8k

TASKS: dict[str, Task] = {}


def register(task: Task) -> None:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}") from None


register(AgNews())
register(Gsm8k())

__all__ = ["TASKS", "Task", "get_task", "register"]
