"""The contract every task module fulfils: where its data lives, its prompt and target, its metric."""

from __future__ import annotations

import hashlib
import inspect
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Sequence

from ..stats import PAIRED_COMPARISONS

# The methods that decide what a model is trained on and how it is scored.
_BEHAVIOUR = ("prompt", "target", "choices", "gold_index", "check_row")


@dataclass(frozen=True)
class ReportMetric:
    """One column of the results table, and how two models are compared on it example by example.

    paired: "binary" (a per-example 0/1 `field`, McNemar), "mean" (a per-example value `field`,
    permutation test) or "macro_f1" (the "gold" and "prediction" fields, classes 0..n_classes-1)."""

    name: str  # the key in metrics.json
    title: str
    higher_is_better: bool
    paired: str
    field: str | None = None
    n_classes: int | None = None

    def __post_init__(self):
        if self.paired not in PAIRED_COMPARISONS:
            raise ValueError(f"metric {self.name!r}: unknown paired comparison {self.paired!r}; "
                             f"valid: {', '.join(PAIRED_COMPARISONS)}")
        if self.paired == "macro_f1" and not self.n_classes:
            raise ValueError(f"metric {self.name!r}: macro_f1 needs n_classes")
        if self.paired != "macro_f1" and not self.field:
            raise ValueError(f"metric {self.name!r}: a {self.paired!r} comparison needs the per-example field")


@dataclass(frozen=True)
class Baseline:
    """A classical baseline of a task: fit on training rows, predict evaluation rows.

    predict(train, evaluation, seed) gives one prediction per evaluation row: the choice index on
    a multiple-choice task; {"prediction": final answer, ...fields kept beside it} on a generation
    task, scored through Task.answer_as_output like a model's output (baselines.py does both)."""

    name: str  # its result folder and table row
    config: dict  # what it is, exactly as written to its result's config
    predict: Callable[[list[dict], list[dict], int], Sequence]


class Task(ABC):
    """A benchmark task. Subclasses are small declarative modules (see ag_news.py, gsm8k.py)."""

    name: ClassVar[str]
    description: ClassVar[str]
    hub_path: ClassVar[str]
    hub_config: ClassVar[str | None] = None
    # Splits of the local mirror; the hub may have fewer (AG News has no validation split there).
    splits: ClassVar[tuple[str, ...]]
    hub_splits: ClassVar[tuple[str, ...]]
    fields: ClassVar[dict[str, type]]
    # "multiple_choice": log-likelihood of each choice; "generation": greedy decoding + extraction.
    kind: ClassVar[str]
    primary_metric: ClassVar[str]
    # (metric, higher is better): what choosing settings on validation data optimises.
    selection_metric: ClassVar[tuple[str, bool]]
    chance: ClassVar[float]
    # Multiple choice: what separates the prompt from a choice (lm-eval's target_delimiter); it is
    # scored with the choice but not counted in acc_norm's per-character normalisation.
    choice_delimiter: ClassVar[str] = " "
    # What the report shows for this task, in column order; the report needs no edit per task.
    report_metrics: ClassVar[tuple[ReportMetric, ...]]
    # The metric retention (model − base)/(expert − base) is computed on: one the expert moves.
    retention_metric: ClassVar[str]
    # Generated targets must teach the model to stop; a scored continuation needs no EOS.
    target_ends_with_eos: ClassVar[bool] = True
    # Generation tasks: where decoding stops (besides EOS), and each reported proportion
    # metric with the boolean per-example field of score_output it counts.
    stop_strings: ClassVar[tuple[str, ...]] = ()
    generation_metrics: ClassVar[dict[str, str]] = {}
    # Bump when the prompt, target or scoring changes through code outside the task's module
    # (the module's own source is hashed into cache keys by fingerprint()).
    version: ClassVar[int] = 1
    # Splits the task's own data statistics (eda_stats) cannot do without.
    eda_splits: ClassVar[tuple[str, ...]] = ()

    @property
    def title(self) -> str:
        """How plots name the task (a subclass sets a class attribute)."""
        return self.name

    @abstractmethod
    def prompt(self, row: dict) -> str:
        """The text the model conditions on."""

    @abstractmethod
    def target(self, row: dict) -> str:
        """The continuation the adapter is trained to produce (loss is computed on it alone)."""

    def check_row(self, row: dict) -> str | None:
        """Why a row is unusable, or None. Field presence and types are checked here."""
        for field, kind in self.fields.items():
            if field not in row:
                return f"missing field {field!r}"
            value = row[field]
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                return f"field {field!r} must be an integer, got {value!r}"
            if kind is str:
                if not isinstance(value, str):
                    return f"field {field!r} must be a string, got {type(value).__name__}"
                if not value.strip():
                    return f"field {field!r} is empty"
        return None

    def reference_answer(self, row: dict) -> str:
        """Generation tasks: the gold answer as the task's comparison sees it."""
        raise TypeError(f"task {self.name!r} is a {self.kind} task, not scored by generation")

    def score_output(self, output: str, row: dict) -> dict:
        """Generation tasks: per-example fields for one generated output (the task owns its
        answer extraction and comparison), including every field named in generation_metrics."""
        raise TypeError(f"task {self.name!r} is a {self.kind} task, not scored by generation")

    def answer_as_output(self, answer: str) -> str:
        """Generation tasks: the output a model would write to give this final answer. Baselines
        answer through it, so the task's own extraction scores them exactly like a model."""
        if self.kind != "generation":
            raise TypeError(f"task {self.name!r} is a {self.kind} task, not scored by generation")
        return answer

    # ---- what the benchmark reports about the task besides models (none by default)

    def baselines(self) -> tuple[Baseline, ...]:
        """The classical baselines every adapter of this task has to clear."""
        return ()

    def eda_stats(self, splits: dict[str, list[dict]]) -> dict:
        """The task's own data statistics (JSON-ready) from validated splits that include
        eda_splits; every task also gets token lengths (eda.py)."""
        return {}

    def eda_plots(self, stats: dict, splits: dict[str, list[dict]], out_dir: Path) -> list[Path]:
        """The task's own figures of its statistics, written atomically into out_dir."""
        return []

    def eda_summary(self, stats: dict) -> list[str]:
        """The lines `loracombench eda` prints about the task's own statistics."""
        return []

    def fingerprint(self) -> dict:
        """What fixes this task's prompts, targets and scoring, for cache keys: its version and a
        hash of the source of its module and of every module its class inherits from besides this
        one (GSM8K's baselines answer through gsm8k_analysis.py), and of the methods the class
        carries now. Any edit there, comments included, invalidates the cached cells of this task
        and only this task."""
        cls = type(self)
        own = [k.__module__ for k in cls.__mro__ if k.__module__ not in (__name__, "builtins", "abc")]
        digest = hashlib.sha256()
        for module in dict.fromkeys(own):
            digest.update(_source(sys.modules[module]).encode())
        for name in _BEHAVIOUR:
            if hasattr(cls, name):
                digest.update(_source(getattr(cls, name)).encode())
        return {"task": self.name, "version": self.version, "code": digest.hexdigest()[:16]}


    def report_metric(self, name: str) -> ReportMetric:
        for metric in self.report_metrics:
            if metric.name == name:
                return metric
        raise ValueError(f"task {self.name!r} declares no report metric {name!r}; "
                         f"valid: {', '.join(m.name for m in self.report_metrics)}")

    def stratum(self, row: dict) -> object | None:
        """The key that subsampling balances on (the label for classification), or None."""
        return None


def _source(obj) -> str:
    """The source text of a module or function; its qualified name when there is none (builtins)."""
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return getattr(obj, "__qualname__", repr(obj))
