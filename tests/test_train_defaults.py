"""`loracombench train` takes every unset training setting from the default preset, per task, so
that the command line and `run` share one source of defaults."""

from __future__ import annotations

import pytest

from conftest import run_subcommand
from loracombench import adapters, config
from loracombench.config import load_config

TINY = ["--model", "tiny-llama", "--device", "cpu", "--checkpoint-every", "0"]


def trained_settings(small_mirror, out, *flags) -> dict:
    run_subcommand(["train", "--task", "ag_news", *TINY, "--data-dir", str(small_mirror), *flags, "--out", str(out)])
    return adapters.read_metadata(out)["config"]


def test_unset_settings_are_the_default_presets(tmp_path, small_mirror):
    preset = load_config().train_settings("ag_news", load_config().seeds[0]).model_dump()
    assert preset["learning_rate"] == 4.0e-3  # chosen on validation (docs/lr_sweep.md), not TrainSettings' 2e-4
    assert trained_settings(small_mirror, tmp_path / "a") == {**preset, "checkpoint_every": 0}


def test_the_presets_per_task_settings_apply_and_flags_override_them(tmp_path, small_mirror, monkeypatch):
    presets = tmp_path / "configs"
    presets.mkdir()
    (presets / "default.yaml").write_text(
        "model: tiny-llama\ntrain: {learning_rate: 3.0e-3, epochs: 1, max_length: 64, batch_size: 12}\n"
        "train_per_task: {ag_news: {learning_rate: 1.0e-3, r: 2}}\n")
    monkeypatch.setattr(config, "PRESETS_DIR", presets)
    per_task = trained_settings(small_mirror, tmp_path / "a")
    assert (per_task["learning_rate"], per_task["r"], per_task["batch_size"]) == (1.0e-3, 2, 12)
    flagged = trained_settings(small_mirror, tmp_path / "b", "--lr", "2e-3", "--seed", "3")
    assert (flagged["learning_rate"], flagged["r"], flagged["seed"]) == (2e-3, 2, 3)


@pytest.mark.parametrize("flag, value", [("--lr", "0"), ("--lora-rank", "0")])
def test_a_bad_flag_is_named_even_when_its_default_comes_from_the_preset(tmp_path, small_mirror, flag, value):
    with pytest.raises(ValueError, match=f"^{'--lr' if flag == '--lr' else '--r'}: "):
        trained_settings(small_mirror, tmp_path / "a", flag, value)
