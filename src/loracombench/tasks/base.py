"""The contract every task module fulfils: where its data lives, its prompt and target, its metric."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from ..stats import PAIRED_COMPARISONS


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
    chance: ClassVar[float]
    # What the report shows for this task, in column order; the report needs no edit per task.
    report_metrics: ClassVar[tuple[ReportMetric, ...]]
    # The metric retention (model − base)/(expert − base) is computed on: one the expert moves.
    retention_metric: ClassVar[str]
    # Generated targets must teach the model to stop; a scored continuation needs no EOS.
    target_ends_with_eos: ClassVar[bool] = True

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

    def report_metric(self, name: str) -> ReportMetric:
        for metric in self.report_metrics:
            if metric.name == name:
                return metric
        raise ValueError(f"task {self.name!r} declares no report metric {name!r}; "
                         f"valid: {', '.join(m.name for m in self.report_metrics)}")

    def stratum(self, row: dict) -> object | None:
        """The key that subsampling balances on (the label for classification), or None."""
        return None
