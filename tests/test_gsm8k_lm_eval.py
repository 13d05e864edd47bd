"""GSM8K scoring is lm-evaluation-harness's `gsm8k` task, verdict for verdict.

How the verdicts were derived: by hand, stepping through lm-eval's own code (task version 3.0,
lm_eval/tasks/gsm8k/gsm8k.yaml; RegexFilter in lm_eval/filters/extraction.py;
exact_match_hf_evaluate in lm_eval/api/metrics.py): findall, pick the first (strict) or last
(flexible) match, first non-empty group, strip, "[invalid]" when nothing matches; then on both
prediction and the full reference solution re.sub "," "\\$" "(?s).*#### " "\\.$" in that order,
lower-case, compare strings. Then cross-checked by running that real code from the lm_eval
0.4.13 wheel (installed with --no-deps outside the project, RegexFilter.apply and
exact_match_hf_evaluate called on every row below): all extractions and verdicts agreed.
"""

from __future__ import annotations

import pytest

from loracombench.tasks import get_task
from loracombench.tasks.gsm8k import FALLBACK, STOP_STRINGS, same_number

GSM8K = get_task("gsm8k")


def solution(final: str) -> str:
    """A reference solution in GSM8K's format, calculator annotation included."""
    return f"She counts 9 + 9 = <<9+9={final}>>{final} apples, at $2 each, so 1,000 cents.\n#### {final}"


# (model output, reference solution, strict extraction, flexible extraction,
#  lm-eval strict verdict, lm-eval flexible verdict, our numeric verdict)
FIXTURE = [
    # plain answers
    ("So 9 + 9 = 18.\n#### 18", solution("18"), "18", "18", True, True, True),
    ("#### 18 apples", solution("18"), "18", "18", True, True, True),
    ("#### 18.", solution("18"), "18.", "18.", True, True, True),  # one trailing dot is ignored
    ("The answer is 18.", solution("18"), FALLBACK, "18.", False, True, True),
    ("THE ANSWER IS 18", solution("18"), FALLBACK, "18", False, True, True),
    ("It costs $ 18", solution("18"), FALLBACK, "18", False, True, True),  # "$ " alone is no match
    ("About 50% of them: 50", solution("50"), FALLBACK, "50", False, True, True),
    # formatting lm-eval does NOT forgive (numeric equivalence does)
    ("#### 18.00", solution("18"), "18.00", "18.00", False, False, True),
    ("#### 3.0", solution("3"), "3.0", "3.0", False, False, True),
    ("$18.00", solution("18"), FALLBACK, "$18.00", False, False, True),
    ("#### 007", solution("7"), "007", "007", False, False, True),
    ("#### -0", solution("0"), "-0", "-0", False, False, True),
    ("The answer is .5", solution("0.5"), FALLBACK, ".5", False, False, True),
    ("#### 18..", solution("18"), "18..", "18..", False, False, True),  # only ONE dot is ignored
    # dollars and commas lm-eval does forgive
    ("#### $18", solution("18"), FALLBACK, "$18", False, True, True),  # `$` is outside strict's class
    ("#### 1,000", solution("1000"), "1,000", "1,000", True, True, True),
    ("#### 1,0,0,0", solution("1000"), "1,0,0,0", "1,0,0,0", True, True, True),  # every comma goes
    ("#### 18,000.", solution("18000"), "18,000.", "18,000.", True, True, True),
    ("There are 1,234,567 people", solution("1234567"), FALLBACK, "1,234,567", False, True, True),
    ("He earned $1,000 in total", "Pay: $1,000.\n#### 1,000", FALLBACK, "$1,000", False, True, True),
    ("#### 1 000", solution("1000"), "1", "000", False, False, False),
    # signs
    ("#### -5", solution("-5"), "-5", "-5", True, True, True),
    ("#### -18", solution("18"), "-18", "-18", False, False, False),
    ("It fell to -$5.", solution("-5"), FALLBACK, "-$5.", False, True, True),
    ("It is 20-2", solution("18"), FALLBACK, "-2", False, False, False),  # the minus binds to 2
    ("So 20 - 2 = 18", solution("18"), FALLBACK, "18", False, True, True),
    # which number is read
    ("#### 18\n#### 19", solution("18"), "18", "19", True, False, False),
    ("#### 19\n#### 18", solution("18"), "19", "18", False, True, True),
    ("#### #### 18", solution("18"), "18", "18", True, True, True),
    ("18 apples and 3 pears", solution("18"), FALLBACK, "3", False, False, False),
    ("The answer is 18, not 17", solution("18"), FALLBACK, "17", False, False, False),
    ("Counting: 18, 19, 20", solution("20"), FALLBACK, "20", False, True, True),  # "18," "19," "20"
    ("1.5.", solution("1.5"), FALLBACK, "1.5.", False, True, True),
    ("The result is 18.5.", solution("18"), FALLBACK, "18.5.", False, False, False),
    ("####18", solution("18"), FALLBACK, "18", False, True, True),  # strict needs "#### " with a space
    ("####  18", solution("18"), FALLBACK, "18", False, True, True),
    # dots and dollars without digits
    ("...", solution("18"), FALLBACK, "...", False, False, False),
    ("18...", solution("18"), FALLBACK, "18...", False, False, False),
    ("#### .", solution("18"), ".", FALLBACK, False, False, False),  # "." alone is too short
    ("Total: 18 $$", solution("18"), FALLBACK, "$$", False, False, False),  # "$$" becomes ""
    # nothing to read
    ("I do not know.", solution("18"), FALLBACK, FALLBACK, False, False, False),
    ("", solution("18"), FALLBACK, FALLBACK, False, False, False),
    # the reference is reduced through its LAST "#### "
    ("#### 18", "First try #### 5\n#### 18", "18", "18", True, True, True),
    ("#### 5", "First try #### 5\n#### 18", "5", "5", False, False, False),
]


@pytest.mark.parametrize("output, answer, strict, flexible, ok_strict, ok_flexible, ok_numeric", FIXTURE)
def test_scoring_matches_lm_eval(output, answer, strict, flexible, ok_strict, ok_flexible, ok_numeric):
    fields = GSM8K.score_output(output, {"question": "Q?", "answer": answer})
    assert fields == {"strict": strict, "flexible": flexible, "correct_strict": ok_strict,
                      "correct_flexible": ok_flexible, "correct_numeric": ok_numeric}


def test_fixture_is_large_and_covers_every_verdict():
    assert len(FIXTURE) >= 30
    verdicts = {(s, f) for *_, s, f, _ in FIXTURE}
    assert verdicts == {(True, True), (True, False), (False, True), (False, False)}


def test_numeric_equivalence_accepts_what_lm_eval_rejects():
    answer = solution("18")
    fields = GSM8K.score_output("So she has 18.0 apples", {"question": "Q?", "answer": answer})
    assert fields["flexible"] == "18.0"
    assert not fields["correct_flexible"] and fields["correct_numeric"]
    assert same_number("-0", "#### 0") and same_number("018", "#### 18")
    assert not same_number(FALLBACK, answer) and not same_number("$$", "#### 0")


def test_reference_answer_is_what_lm_eval_compares():
    assert GSM8K.reference_answer({"answer": solution("1,000")}) == "1000"
    assert GSM8K.reference_answer({"answer": "Pay $5.\n#### 5."}) == "5"


def test_stop_strings_are_lm_evals_until():
    # gsm8k.yaml generation_kwargs.until; lm-eval's HF backend appends EOS, as we stop at EOS.
    assert STOP_STRINGS == ("Question:", "</s>", "<|im_end|>")
    assert GSM8K.stop_strings == STOP_STRINGS


def test_generation_metrics_name_score_output_fields():
    fields = GSM8K.score_output("#### 18", {"question": "Q?", "answer": solution("18")})
    assert set(GSM8K.generation_metrics.values()) <= set(fields)
    assert GSM8K.primary_metric in GSM8K.generation_metrics
