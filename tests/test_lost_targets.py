"""scripts/lost_targets.py, the audit behind the README's count of the targets the training loss
left out before TARGET_LOSS_VERSION 2: it sees the loss the old slice lost, and finds the batches
of every composition that takes the loss."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from loracombench.models import load_tokenizer
from loracombench.tasks import get_task
from loracombench.training import IGNORE_INDEX, collate, encode_rows
from test_pipeline_compositions import SMOKE
from test_training_and_adapters import GSM_ROWS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import lost_targets  # noqa: E402  (scripts/ is a folder of scripts, not a package)


def test_the_old_slice_loses_the_short_rows_targets_that_collate_now_keeps():
    tokenizer = load_tokenizer("tiny-llama")
    batch = encode_rows(tokenizer, get_task("gsm8k"), GSM_ROWS, 128)
    lost, total = lost_targets.lost_by_wrapping_slice(batch)
    kept = int((collate(batch, tokenizer.pad_token_id)["labels"] != IGNORE_INDEX).sum())
    assert total == kept and 0 < lost < total, (lost, total)
    # Alone, each row keeps every target under the old slice too.
    assert [lost_targets.lost_by_wrapping_slice([e])[0] for e in batch] == [0, 0]


def test_every_composition_that_takes_the_loss_is_replayed(tmp_path, small_mirror, monkeypatch, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**SMOKE, "data_dir": str(small_mirror), "compositions": [
        {"method": "lorahub", "params": {"budget": 4, "n_validation": 2}},
        {"method": "lora_soups", "params": {"n_validation": 2}}, {"method": "multitask"},
        {"method": "route_oracle"}]}))
    monkeypatch.setattr(sys, "argv", ["lost_targets.py", str(config)])
    lost_targets.main()
    rows = [line.split(" | ")[1] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["expert ag_news, seed 0", "expert gsm8k, seed 0", "lorahub_budget4_n_validation2, seed 0",
                    "lora_soups_n_validation2, seed 0", "multitask, seed 0"]


def test_an_unknown_preset_is_one_clear_error_before_any_output(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lost_targets.py", "default", "no-such-preset"])
    with pytest.raises(SystemExit) as exit_info:
        lost_targets.main()
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    assert "no config file or preset 'no-such-preset'" in captured.err and "Traceback" not in captured.err
