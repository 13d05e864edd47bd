"""GSM8K grade-school math (Cobbe et al. 2021), scored by greedy generation and exact match.

Scoring is lm-evaluation-harness's `gsm8k` task (lm_eval/tasks/gsm8k/gsm8k.yaml, task version
3.0), reimplemented here: an output is judged exactly as lm-eval judges it. The prompt is that
task's doc_to_text, but zero-shot where lm-eval's default is 5-shot, so our exact-match numbers are
not comparable with published (5-shot) lm-eval GSM8K numbers. The scoring:

- Extraction is lm-eval's `RegexFilter` (lm_eval/filters/extraction.py): `re.findall` of the
  pattern over the whole output, pick one match (`group_select`), a tuple match (a pattern with
  several groups) becomes its first non-empty group, `.strip()` it; no match at all gives the
  fallback "[invalid]".
  - `strict-match`: pattern `#### (\\-?[0-9\\.\\,]+)`, the FIRST match;
  - `flexible-extract`: pattern `(-?[$0-9.,]{2,})|(-?[0-9]+)`, the LAST match (group_select -1).
- Comparison is lm-eval's `exact_match` (lm_eval/api/metrics.py, `exact_match_hf_evaluate`)
  with the yaml's keyword arguments: each of the regexes_to_ignore `,`  `\\$`  `(?s).*#### `
  `\\.$` is removed in that order with `re.sub` from BOTH prediction and reference, then both
  are lower-cased (ignore_case true; ignore_punctuation false), then compared as strings.
- The reference is the yaml's doc_to_target `{{answer}}`: the whole reference solution,
  verbatim; the `(?s).*#### ` pattern is what reduces it to its final answer.

So "18.00", "007", "-0" and ".5" do NOT match a gold 18 (or 7, 0, 0.5), nor does "#### $18" under
strict-match (flexible-extract takes "$18", which matches); "$18", "1,000" and one trailing full
stop do. `exact_match_numeric` is our own, NOT lm-eval: the flexible
extraction compared with the reference as decimal numbers, which forgives those formatting
differences. It is reported beside lm-eval's two scores, never instead of them.

The training target is the reference solution with its calculator annotations (<<48/2=24>>)
removed: they cost tokens and carry no reasoning the text does not already state.
"""

from __future__ import annotations

import re
from decimal import Decimal

from .base import ReportMetric, Task
from .gsm8k_analysis import Gsm8kAnalysis

_CALCULATOR = re.compile(r"<<[^>]*>>")
FINAL_ANSWER_LINE = re.compile(r"#### -?[0-9][0-9,]*(\.[0-9]+)?")
STRICT_PATTERN = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_PATTERN = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
FALLBACK = "[invalid]"
IGNORED_PATTERNS = tuple(re.compile(p) for p in (",", r"\$", r"(?s).*#### ", r"\.$"))
_DECIMAL = re.compile(r"-?(\d+\.?\d*|\.\d+)")
# lm-eval's gsm8k `until`; its HF backend also stops at EOS, as our generate() does. We add
# nothing to it: flexible-extract reads the LAST number of the whole continuation, so any
# extra stop string would change which number is scored.
STOP_STRINGS = ("Question:", "</s>", "<|im_end|>")


def regex_extract(pattern: re.Pattern, text: str, which: int) -> str:
    """lm-eval RegexFilter on one response: the `which`-th findall match, or FALLBACK."""
    matches = pattern.findall(text)
    if not matches:
        return FALLBACK
    match = matches[which]
    if isinstance(match, tuple):
        match = next((group for group in match if group), FALLBACK)
    return match.strip()


def extract_strict(output: str) -> str:
    return regex_extract(STRICT_PATTERN, output, 0)


def extract_flexible(output: str) -> str:
    return regex_extract(FLEXIBLE_PATTERN, output, -1)


def comparable(text: str) -> str:
    """What lm-eval's gsm8k exact_match compares: ignored patterns removed, then lower case."""
    for pattern in IGNORED_PATTERNS:
        text = pattern.sub("", text)
    return text.lower()


def exact_match(prediction: str, reference: str) -> bool:
    return comparable(prediction) == comparable(reference)


def decimal_value(text: str) -> Decimal | None:
    """The number a comparable string spells, or None (only plain decimals, no exponents)."""
    return Decimal(text) if _DECIMAL.fullmatch(text) else None


def same_number(prediction: str, reference: str) -> bool:
    """Numeric equivalence (NOT lm-eval): 18.00, 018 and 18. all equal 18; -0 equals 0."""
    predicted, gold = decimal_value(comparable(prediction)), decimal_value(comparable(reference))
    return predicted is not None and predicted == gold


class Gsm8k(Gsm8kAnalysis, Task):
    name = "gsm8k"
    title = "GSM8K"
    description = "GSM8K: grade-school math word problems, final numeric answer"
    hub_path = "openai/gsm8k"
    hub_config = "main"
    splits = ("train", "test")
    hub_splits = ("train", "test")
    fields = {"question": str, "answer": str}
    kind = "generation"
    primary_metric = "exact_match_flexible"
    # What the learning-rate sweep minimises on validation data: exact match of a 135M model is
    # near zero and too coarse to rank settings, the gold solution's NLL is not.
    selection_metric = ("gold_nll", False)
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
    generation_metrics = {"exact_match_strict": "correct_strict",
                          "exact_match_flexible": "correct_flexible",
                          "exact_match_numeric": "correct_numeric"}
    version = 1

    def prompt(self, row: dict) -> str:
        return f"Question: {row['question'].strip()}\nAnswer:"

    def target(self, row: dict) -> str:
        return " " + _CALCULATOR.sub("", row["answer"]).strip()

    def reference_answer(self, row: dict) -> str:
        """The gold final answer as lm-eval's exact_match sees it (e.g. "1000" for "#### 1,000")."""
        return comparable(row["answer"])

    def score_output(self, output: str, row: dict) -> dict:
        strict, flexible = extract_strict(output), extract_flexible(output)
        return {"strict": strict, "flexible": flexible,
                "correct_strict": exact_match(strict, row["answer"]),
                "correct_flexible": exact_match(flexible, row["answer"]),
                "correct_numeric": same_number(flexible, row["answer"])}

    def check_row(self, row: dict) -> str | None:
        problem = super().check_row(row)
        # lm-eval reduces the reference to its answer by deleting through the last "#### " (with
        # the space): without a final "#### <number>" line the gold answer would be a sentence
        # or empty, and no output would ever match it.
        lines = row["answer"].strip().splitlines() if problem is None else []
        if problem is None and not (lines and FINAL_ANSWER_LINE.fullmatch(lines[-1].strip())):
            problem = "answer has no '#### <number>' final line"
        return problem
