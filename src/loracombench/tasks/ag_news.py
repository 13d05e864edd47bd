"""AG News topic classification (Zhang, Zhao & LeCun 2015), scored as multiple choice.

The model reads the article and we compare the log-likelihood of the four topic names as
continuations, as lm-eval-harness scores multiple-choice tasks. The adapter is trained on the
topic name as the continuation of the prompt.
"""

from __future__ import annotations

from .ag_news_analysis import AgNewsAnalysis
from .base import ReportMetric, Task

# The dataset calls class 3 "Sci/Tech"; as a continuation that is three tokens for SmolLM2 and
# GPT-2 alike, and summed log-likelihood then never picks it: the base model predicted it for 0 of
# 200 validation articles. "Technology" is one token, and of the label sets compared on validation
# (`loracombench verbalizers`, README) it gives the base model its best acc and acc_norm.
DATASET_LABELS = ("World", "Sports", "Business", "Sci/Tech")
LABELS = ("World", "Sports", "Business", "Technology")


class AgNews(AgNewsAnalysis, Task):
    name = "ag_news"
    title = "AG News"
    description = "AG News: 4-way news topic classification (World, Sports, Business, Sci/Tech as 'Technology')"
    hub_path = "fancyzhx/ag_news"
    splits = ("train", "validation", "test")
    hub_splits = ("train", "test")
    fields = {"text": str, "label": int}
    kind = "multiple_choice"
    primary_metric = "accuracy"
    # What the learning-rate sweep maximises on validation data.
    selection_metric = ("accuracy", True)
    chance = 1 / len(LABELS)
    labels = LABELS  # the words scored and trained on
    class_names = DATASET_LABELS  # what the dataset calls the classes (EDA)
    report_metrics = (
        ReportMetric("accuracy", "AG News acc", True, "binary", field="correct"),
        ReportMetric("accuracy_norm", "AG News acc_norm", True, "binary", field="correct_norm"),
        ReportMetric("macro_f1", "AG News macro-F1", True, "macro_f1", n_classes=len(LABELS)),
    )
    retention_metric = "accuracy"
    # The label is scored as a continuation, never generated: an EOS after it would only spend
    # the small training budget on a token the evaluation never reads.
    target_ends_with_eos = False
    version = 1

    def __init__(self, labels: tuple[str, ...] = LABELS):
        if len(labels) != len(LABELS) or len(set(labels)) != len(labels):
            raise ValueError(f"AG News needs {len(LABELS)} distinct labels, got {labels}")
        self.labels = tuple(labels)

    def prompt(self, row: dict) -> str:
        listed = ", ".join(self.labels[:-1]) + f" or {self.labels[-1]}"
        return f"Classify the news article as {listed}.\n\nArticle: {row['text'].strip()}\nTopic:"

    def choices(self, row: dict) -> list[str]:
        # Scored after choice_delimiter (a space): the prompt ends in "Topic:" and BPE
        # vocabularies attach the space to the word that follows.
        return list(self.labels)

    def gold_index(self, row: dict) -> int:
        return row["label"]

    def target(self, row: dict) -> str:
        return self.choice_delimiter + self.choices(row)[self.gold_index(row)]

    def check_row(self, row: dict) -> str | None:
        problem = super().check_row(row)
        if problem is None and not 0 <= row["label"] < len(self.labels):
            problem = f"label {row['label']} out of range 0..{len(self.labels) - 1}"
        return problem

    def stratum(self, row: dict) -> object:
        return row["label"]
