"""GSM8K grade-school math (Cobbe et al. 2021), scored by greedy generation and exact match.

Answer extraction follows lm-eval-harness's two GSM8K filters: "strict" reads the number after
"#### ", "flexible" takes the last number in the output. Both strip thousands commas, a dollar
sign and a trailing full stop before comparing with the gold number. The training target is the
reference solution with its calculator annotations (<<48/2=24>>) removed: they cost tokens and
carry no reasoning the text does not already state.
"""

from __future__ import annotations

import re

from .base import ReportMetric, Task

_CALCULATOR = re.compile(r"<<[^>]*>>")
_STRICT = re.compile(r"#### (\-?[0-9\.\,\$]+)")
_NUMBER = re.compile(r"-?[$0-9.,]{2,}|-?[0-9]+")
# lm-eval-harness stops GSM8K generations at these; a trained adapter ends with EOS first.
STOP_STRINGS = ("Question:", "</s>", "<|im_end|>", "\n\n\n")


def normalize_number(text: str) -> str:
    text = text.strip().replace(",", "").replace("$", "")
    return text.rstrip(".")


def extract_strict(output: str) -> str | None:
    match = _STRICT.search(output)
    return normalize_number(match.group(1)) if match else None


def extract_flexible(output: str) -> str | None:
    numbers = [normalize_number(n) for n in _NUMBER.findall(output)]
    numbers = [n for n in numbers if n not in ("", "-")]
    return numbers[-1] if numbers else None


def gold_answer(row: dict) -> str:
    return normalize_number(row["answer"].split("####")[-1])


def same_number(predicted: str | None, gold: str) -> bool:
    """Exact match on the normalised strings, also accepting 18.0 for 18."""
    if predicted is None:
        return False
    if predicted == gold:
        return True
    try:
        return float(predicted) == float(gold)
    except ValueError:
        return False


class Gsm8k(Task):
    name = "gsm8k"
    description = "GSM8K: grade-school math word problems, final numeric answer"
    hub_path = "openai/gsm8k"
    hub_config = "main"
    splits = ("train", "test")
    hub_splits = ("train", "test")
    fields = {"question": str, "answer": str}
    kind = "generation"
    primary_metric = "exact_match_flexible"
    chance = 0.0
    report_metrics = (
        ReportMetric("exact_match_flexible", "GSM8K EM (flexible)", True, "binary", field="correct_flexible"),
        ReportMetric("exact_match_strict", "GSM8K EM (strict)", True, "binary", field="correct_strict"),
        ReportMetric("gold_nll", "GSM8K gold NLL ↓", False, "mean", field="gold_nll"),
    )
    # A small model's exact match is near zero for base and expert alike, so retention on it is
    # noise over noise; the gold NLL moves with every adapter.
    retention_metric = "gold_nll"
    stop_strings = STOP_STRINGS

    def prompt(self, row: dict) -> str:
        return f"Question: {row['question'].strip()}\nAnswer:"

    def target(self, row: dict) -> str:
        return " " + _CALCULATOR.sub("", row["answer"]).strip()

    def check_row(self, row: dict) -> str | None:
        problem = super().check_row(row)
        if problem is None and "####" not in row["answer"]:
            problem = "answer has no '#### <number>' final line"
        return problem
