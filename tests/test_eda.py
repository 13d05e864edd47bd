"""EDA statistics against hand-computed values, bad input, and the `eda` subcommand."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pytest
from conftest import MIRROR, needs_mirror, run_subcommand as run_cli
from conftest import write_mirror as write_splits

from loracombench import eda
from loracombench.data import DataError
from loracombench.tasks import ag_news_analysis, eda_tools, gsm8k_analysis



def words(n: int) -> str:
    return " ".join(["w"] * n)


# AG News. Train lengths per class: World 1,2,3 | Sports 4,5,6 | Business 7,8 | Sci/Tech 9.
AG_TRAIN = [{"text": words(n), "label": y}
            for n, y in [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1), (6, 1), (7, 2), (8, 2), (9, 3)]]
# Test: the stump (<= 3.5 -> World, else Sports) gets rows 0, 1 and 3 right: 3/5.
AG_TEST = [{"text": words(n), "label": y} for n, y in [(2, 0), (5, 1), (8, 2), (3, 0), (10, 3)]]

# GSM8K. Question words 1..5; answer words 2, 4, 5, 4, 5 (the '#### N' line counts as 2 words).
ANSWERS = [
    "#### 5",                                   # 2 words, 0 steps, 0 annotations
    "Add <<1+1=2>>2.\n#### 2",                  # 4 words, 1 step, 1 annotation
    "One <<2*3=6>>6<<6+1=7>>7.\n\nTwo.\n#### 7",  # 5 words, 2 steps (blank line skipped), 2
    "First step.\n#### 2",                      # 4 words, 1 step, 0 annotations
    "A <<1+2=3>>3\nB<<3+4=7>>7\n#### 7",          # 5 words, 2 steps, 2 annotations
]
GSM_TRAIN = [{"question": words(q), "answer": a} for q, a in zip([1, 2, 3, 4, 5], ANSWERS)]


def test_word_counts_of_the_hand_made_answers():
    assert [eda_tools.word_count(a) for a in ANSWERS] == [2, 4, 5, 4, 5]
    assert [gsm8k_analysis.reasoning_steps(a) for a in ANSWERS] == [0, 1, 2, 1, 2]
    assert [gsm8k_analysis.calculator_annotations(a) for a in ANSWERS] == [0, 1, 2, 0, 2]


def test_ag_news_counts_lengths_and_length_classifier():
    stats = eda.compute_stats("ag_news", {"train": AG_TRAIN, "test": AG_TEST})
    train = stats["splits"]["train"]
    assert train["class_counts"] == {"World": 3, "Sports": 3, "Business": 2, "Sci/Tech": 1}
    assert stats["splits"]["test"]["class_counts"] == {"World": 2, "Sports": 1, "Business": 1,
                                                      "Sci/Tech": 1}
    assert train["word_length"]["mean"] == 5.0 and train["word_length"]["max"] == 9.0
    assert train["word_length_by_class"]["Business"]["mean"] == 7.5
    assert stats["token_lengths"] is None

    lpc = stats["length_predicts_class"]
    stump = lpc["decision_stump"]
    assert stump["threshold"] == 3.5
    assert (stump["left_class"], stump["right_class"]) == ("World", "Sports")
    assert stump["train_accuracy"] == pytest.approx(6 / 9)
    assert stump["accuracy"]["value"] == pytest.approx(3 / 5) and stump["accuracy"]["n"] == 5
    assert lpc["chance"] == 0.25
    # World and Sports tie for the majority in train; the lower label wins. 2 of 5 test rows.
    assert lpc["majority_class"]["label"] == "World"
    assert lpc["majority_class"]["accuracy"]["value"] == pytest.approx(2 / 5)
    assert lpc["logistic_regression"]["accuracy"]["n"] == 5

    # Kruskal-Wallis without ties: H = 12/(N(N+1)) * sum(R_i^2/n_i) - 3(N+1),
    # rank sums 6, 15, 15, 9 for group sizes 3, 3, 2, 1 and N = 9.
    h = 12 / 90 * (6**2 / 3 + 15**2 / 3 + 15**2 / 2 + 9**2 / 1) - 30
    kw = lpc["kruskal_wallis"]["train"]
    assert kw["H"] == pytest.approx(h) and kw["H"] == pytest.approx(7.4)
    assert kw["df"] == 3 and 0 < kw["p_value"] < 1


def test_prompts_shared_between_splits_are_counted_exactly_and_loosely():
    train = [{"text": "Stocks rise", "label": 2}, {"text": "Goal!", "label": 1}, {"text": "Rain", "label": 0}]
    test = [{"text": "Stocks rise", "label": 2}, {"text": "goal! ", "label": 1}, {"text": "Snow", "label": 0}]
    shared = eda.compute_stats("ag_news", {"train": train, "test": test})["shared_prompts"]
    # the prompt strips the text, so "goal! " differs from "Goal!" only in case
    assert shared == {"train/test": {"same_prompt": 1, "same_ignoring_whitespace_and_case": 2}}
    lines = eda.summary_lines(eda.compute_stats("ag_news", {"train": train, "test": test}))
    assert "ag_news: prompts shared between splits: train/test 1 (2 ignoring whitespace and case)" in lines


def test_stump_tie_rules_and_degenerate_input():
    # Lengths 1,2 -> class 1; 3,4 -> class 0: threshold 2.5, left 1, right 0.
    stump = ag_news_analysis.fit_length_stump([1, 2, 3, 4], [1, 1, 0, 0])
    assert stump == {"threshold": 2.5, "left_class": 1, "right_class": 0, "train_accuracy": 1.0}
    assert list(ag_news_analysis.predict_length_stump(stump, [0, 2.5, 2.6, 99])) == [1, 1, 0, 0]
    # One distinct length: no split, the majority class (lower label on ties) everywhere.
    flat = ag_news_analysis.fit_length_stump([5, 5, 5, 5], [2, 1, 2, 1])
    assert flat["threshold"] is None and flat["left_class"] == flat["right_class"] == 1
    assert list(ag_news_analysis.predict_length_stump(flat, [1, 9])) == [1, 1]


def test_gsm8k_correlations_steps_and_annotations():
    stats = eda.compute_stats("gsm8k", {"train": GSM_TRAIN})
    s = stats["splits"]["train"]
    assert s["question_words"]["mean"] == 3.0 and s["answer_words"]["mean"] == 4.0
    corr = s["question_answer_correlation"]
    # Deviations q: -2 -1 0 1 2, a: -2 0 1 0 1 -> Sxy = 6, Sxx = 10, Syy = 6.
    r = 6 / math.sqrt(10 * 6)
    # Answer ranks (ties averaged) 1, 2.5, 4.5, 2.5, 4.5 -> Sxy = 7, Syy = 9.
    rho = 7 / math.sqrt(10 * 9)
    assert corr["pearson"]["r"] == pytest.approx(r)
    assert corr["spearman"]["r"] == pytest.approx(rho)
    z, se = math.atanh(r), 1 / math.sqrt(5 - 3)
    assert corr["pearson"]["ci_low"] == pytest.approx(math.tanh(z - 1.959964 * se))
    assert corr["pearson"]["ci_high"] == pytest.approx(math.tanh(z + 1.959964 * se))
    z, se = math.atanh(rho), math.sqrt(1.06 / (5 - 3))
    assert corr["spearman"]["ci_low"] == pytest.approx(math.tanh(z - 1.959964 * se))
    assert s["fit_line"]["slope"] == pytest.approx(0.6) and s["fit_line"]["intercept"] == pytest.approx(2.2)
    assert s["reasoning_steps"]["histogram"] == {"0": 1, "1": 2, "2": 2}
    assert s["reasoning_steps"]["mean"] == pytest.approx(6 / 5)
    assert s["calculator_annotations"]["histogram"] == {"0": 2, "1": 1, "2": 2}
    assert s["calculator_annotations"]["answers_without_annotation"] == 2


def test_fisher_interval_is_undefined_for_tiny_samples():
    assert eda_tools.fisher_ci(0.5, 3) == (None, None)
    corr = eda_tools.correlation([1, 2, 3], [3, 1, 2])
    assert corr["pearson"]["ci_low"] is None and corr["pearson"]["r"] == pytest.approx(-0.5)
    constant = eda_tools.correlation([1, 1, 1, 1, 1], [1, 2, 3, 4, 5])
    assert constant["pearson"]["r"] is None and constant["spearman"]["r"] is None


def whitespace_tokenizer():
    """A real HF tokenizer whose tokens are whitespace-separated words (all unknown but one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_token_lengths_with_a_word_level_tokenizer():
    tokenizer = whitespace_tokenizer()
    stats = eda.compute_stats("gsm8k", {"train": GSM_TRAIN}, tokenizer=tokenizer)
    tokens = stats["token_lengths"]["splits"]["train"]
    # Prompt "Question: <q words>\nAnswer:" = q + 2 tokens. The target drops the annotations,
    # which are glued to other words here, so it keeps the answer's 2, 4, 5, 4, 5 words.
    assert tokens["prompt"]["min"] == 3 and tokens["prompt"]["max"] == 7
    assert tokens["target"]["mean"] == pytest.approx(4.0)
    assert tokens["prompt_plus_target"]["p50"] == 10.0     # 5, 8, 10, 10, 12
    assert tokens["prompt_plus_target"]["max"] == 12.0
    assert stats["token_lengths"]["all_splits"]["prompt_plus_target"]["n"] == 5
    ag = eda.compute_stats("ag_news", {"train": AG_TRAIN, "test": AG_TEST}, tokenizer=tokenizer)
    # 10 instruction words + "Article:" + text + "Topic:" and the one-word topic.
    assert ag["token_lengths"]["splits"]["test"]["prompt_plus_target"]["max"] == 12 + 10 + 1


def test_bad_splits_raise_before_any_output(tmp_path):
    with pytest.raises(DataError, match="needs the split"):
        eda.compute_stats("ag_news", {"train": AG_TRAIN})
    with pytest.raises(DataError, match="empty"):
        eda.compute_stats("gsm8k", {"train": []})
    with pytest.raises(ValueError, match="unknown task"):
        eda.compute_stats("nope", {"train": AG_TRAIN})

    mirror = tmp_path / "mirror"
    write_mirror(mirror)
    (mirror / "ag_news" / "test.jsonl").unlink()
    out = tmp_path / "out"
    with pytest.raises(DataError, match="test.jsonl: file not found"):
        eda.run_eda(["ag_news"], mirror, out)
    assert not out.exists()

    write_mirror(mirror)
    (mirror / "gsm8k" / "train.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        eda.run_eda(["gsm8k"], mirror, out)
    assert not out.exists()


def write_mirror(root: Path) -> Path:
    return write_splits(root, {"ag_news": {"train": AG_TRAIN, "validation": AG_TEST, "test": AG_TEST},
                                "gsm8k": {"train": GSM_TRAIN, "test": GSM_TRAIN}})


def test_eda_command_writes_stats_and_plots(tmp_path, capsys):
    mirror = write_mirror(tmp_path / "mirror")
    out = tmp_path / "eda"
    assert run_cli(["eda", "--data-dir", str(mirror), "--out", str(out), "--no-tokens"]) == 0
    record = json.loads((out / eda.STATS_FILE).read_text())
    assert record["schema"] == eda.SCHEMA and set(record["tasks"]) == {"ag_news", "gsm8k"}
    assert record["tasks"]["ag_news"]["splits"]["validation"]["n"] == 5
    expected = {"ag_news_class_counts.png", "ag_news_word_lengths.png", "gsm8k_length_scatter.png",
                "gsm8k_word_lengths.png", "gsm8k_steps_annotations.png"}
    assert set(record["plots"]) == expected
    for name in expected:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    assert "gsm8k train: question/answer words Pearson 0.775" in capsys.readouterr().out


def test_eda_command_loads_the_base_tokenizer_lazily(tmp_path, monkeypatch):
    requested = []

    def load_tokenizer(name="smollm2-135m"):
        requested.append(name)
        return whitespace_tokenizer()

    monkeypatch.setitem(__import__("sys").modules, "loracombench.models",
                        types.SimpleNamespace(load_tokenizer=load_tokenizer))
    mirror = write_mirror(tmp_path / "mirror")
    out = tmp_path / "eda"
    assert run_cli(["eda", "--task", "gsm8k", "--data-dir", str(mirror), "--out", str(out)]) == 0
    assert requested == ["smollm2-135m"]
    record = json.loads((out / eda.STATS_FILE).read_text())
    assert record["tasks"]["gsm8k"]["token_lengths"]["all_splits"]["prompt_plus_target"]["n"] == 10
    assert (out / "gsm8k_token_lengths.png").is_file()


def test_eda_command_with_a_missing_split_writes_nothing(tmp_path):
    mirror = write_mirror(tmp_path / "mirror")
    (mirror / "gsm8k" / "test.jsonl").unlink()
    out = tmp_path / "eda"
    with pytest.raises(DataError, match="file not found"):
        run_cli(["eda", "--data-dir", str(mirror), "--out", str(out), "--no-tokens"])
    assert not out.exists()


@needs_mirror
def test_gsm8k_train_correlation_on_the_mirror_matches_its_readme():
    from loracombench.data import load_split

    stats = eda.compute_stats("gsm8k", {"train": load_split("gsm8k", "train", MIRROR)})
    corr = stats["splits"]["train"]["question_answer_correlation"]
    assert corr["n"] == 7473
    assert round(corr["pearson"]["r"], 3) == 0.479
    assert round(corr["spearman"]["r"], 3) == 0.507
    assert corr["pearson"]["ci_low"] < 0.479 < corr["pearson"]["ci_high"]
