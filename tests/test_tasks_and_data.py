"""Tasks (prompts, targets, answer extraction) and data loading (validation, sampling)."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import needs_mirror, MIRROR, write_jsonl

from loracombench.data import DataError, load_sample, load_split, subsample
from loracombench.tasks import get_task


# ---------------------------------------------------------------- prompts and targets
# (GSM8K answer extraction and comparison: tests/test_gsm8k_lm_eval.py)

def test_gsm8k_target_drops_calculator_annotations():
    task = get_task("gsm8k")
    row = {"question": "Q?", "answer": "2 + 3 = <<2+3=5>>5 apples\n#### 5"}
    assert task.target(row) == " 2 + 3 = 5 apples\n#### 5"
    assert task.prompt(row) == "Question: Q?\nAnswer:"


def test_ag_news_choices_and_target():
    task = get_task("ag_news")
    row = {"text": "Stocks rally", "label": 3}
    assert task.choices(row) == ["World", "Sports", "Business", "Technology"] and task.choice_delimiter == " "
    assert task.target(row) == " Technology" and task.prompt(row).endswith("Topic:")
    assert "as World, Sports, Business or Technology." in task.prompt(row)
    assert task.chance == 0.25


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match="ag_news, gsm8k"):
        get_task("mnli")


# ---------------------------------------------------------------- bad rows

BAD_ROWS = [
    ('{"text": "ok", "label": 1}\n{"text": "broken", "label": ', "invalid JSON", 2),
    ('{"text": "ok", "label": 1}\n{"label": 2}', "missing field 'text'", 2),
    ('{"text": "ok", "label": 7}', "label 7 out of range", 1),
    ('{"text": "ok", "label": 1}\n{"text": "ok", "label": 2}\n{"text": "   ", "label": 0}', "field 'text' is empty", 3),
    ('{"text": "ok", "label": "2"}', "must be an integer", 1),
    ('[1, 2]', "must be a JSON object", 1),
]


@pytest.mark.parametrize("content, message, line", BAD_ROWS)
def test_bad_rows_name_file_and_line(tmp_path, content, message, line):
    path = tmp_path / "ag_news" / "train.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(content + "\n")
    with pytest.raises(DataError, match=rf"train\.jsonl:{line}: .*{message}"):
        load_split("ag_news", "train", tmp_path)


# lm-eval reads the gold after the last "#### ": it must end the answer and be a number
@pytest.mark.parametrize("answer", ["just 4", "so ####4", "x\n#### ", "x\n#### forty", "the #### 5 is early\nthen 6"])
def test_gsm8k_answer_without_final_line(tmp_path, answer):
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "Q", "answer": answer}])
    with pytest.raises(DataError, match=r"test\.jsonl:1: .*####"):
        load_split("gsm8k", "test", tmp_path)


def test_missing_file_empty_split_and_unknown_split(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_split("ag_news", "train", tmp_path)
    (tmp_path / "ag_news").mkdir()
    (tmp_path / "ag_news" / "test.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_split("ag_news", "test", tmp_path)
    with pytest.raises(DataError, match="no 'validation' split"):
        load_split("gsm8k", "validation", tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_split("gsm8k", "test", tmp_path / "nowhere")


# ---------------------------------------------------------------- sampling

def test_stratified_seeded_subsample(small_mirror):
    rows = load_split("ag_news", "train", small_mirror)  # 6 per class
    first = load_sample("ag_news", "train", 8, seed=3, data_dir=small_mirror)
    assert first == load_sample("ag_news", "train", 8, seed=3, data_dir=small_mirror)
    assert first != load_sample("ag_news", "train", 8, seed=4, data_dir=small_mirror)
    assert Counter(r["label"] for r in first) == {0: 2, 1: 2, 2: 2, 3: 2}
    assert all(r in rows for r in first)
    assert subsample(rows, None, 0) == rows and subsample(rows, 10_000, 0) == rows
    with pytest.raises(DataError, match="positive"):
        subsample(rows, 0, 0)


def test_stratification_follows_class_proportions():
    rows = [{"text": "x", "label": 0}] * 30 + [{"text": "y", "label": 1}] * 10
    picked = subsample(rows, 8, seed=0, task=get_task("ag_news"))
    assert Counter(r["label"] for r in picked) == {0: 6, 1: 2}


@needs_mirror
def test_real_mirror_sizes_and_balance():
    assert len(load_split("ag_news", "validation", MIRROR)) == 500
    sample = load_sample("ag_news", "test", 200, seed=1234, data_dir=MIRROR)
    assert Counter(r["label"] for r in sample) == {0: 50, 1: 50, 2: 50, 3: 50}
    assert len(load_split("gsm8k", "test", MIRROR)) == 1319
