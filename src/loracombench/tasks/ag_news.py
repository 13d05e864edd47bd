"""AG News topic classification (Zhang, Zhao & LeCun 2015), scored as multiple choice.

The model reads the article and we compare the log-likelihood of the four topic names as
continuations, as lm-eval-harness scores multiple-choice tasks. The adapter is trained on the
topic name as the continuation of the prompt.
"""

from __future__ import annotations

from .base import ReportMetric, Task

LABELS = ("World", "Sports", "Business", "Sci/Tech")


class AgNews(Task):
    name = "ag_news"
    description = "AG News: 4-way news topic classification (World, Sports, Business, Sci/Tech)"
    hub_path = "fancyzhx/ag_news"
    splits = ("train", "validation", "test")
    hub_splits = ("train", "test")
    fields = {"text": str, "label": int}
    kind = "multiple_choice"
    primary_metric = "accuracy"
    chance = 1 / len(LABELS)
    labels = LABELS
    report_metrics = (
        ReportMetric("accuracy", "AG News acc", True, "binary", field="correct"),
        ReportMetric("macro_f1", "AG News macro-F1", True, "macro_f1", n_classes=len(LABELS)),
    )
    retention_metric = "accuracy"
    # The label is scored as a continuation, never generated: an EOS after it would only spend
    # the small training budget on a token the evaluation never reads.
    target_ends_with_eos = False

    def prompt(self, row: dict) -> str:
        return (
            "Classify the news article as World, Sports, Business or Sci/Tech.\n\n"
            f"Article: {row['text'].strip()}\nTopic:"
        )

    def choices(self, row: dict) -> list[str]:
        # A leading space, because the prompt ends in "Topic:" and BPE vocabularies
        # attach the space to the word that follows.
        return [f" {label}" for label in LABELS]

    def gold_index(self, row: dict) -> int:
        return row["label"]

    def target(self, row: dict) -> str:
        return self.choices(row)[self.gold_index(row)]

    def check_row(self, row: dict) -> str | None:
        problem = super().check_row(row)
        if problem is None and not 0 <= row["label"] < len(LABELS):
            problem = f"label {row['label']} out of range 0..{len(LABELS) - 1}"
        return problem

    def stratum(self, row: dict) -> object:
        return row["label"]
