"""Cells spread over local worker processes give the numbers of a run in one process."""

from __future__ import annotations

import pytest

from loracombench import io
from loracombench.config import ExperimentConfig
from loracombench.executors import ProcessExecutor
from loracombench.pipeline import run_experiment

SMOKE = {
    "name": "t", "model": "tiny-llama", "n_train": {"ag_news": 8, "gsm8k": 4},
    "train": {"epochs": 1, "batch_size": 4, "max_length": 64},
    "eval": {"n_eval": {"ag_news": 8, "gsm8k": 3}, "n_generate": 2, "max_new_tokens": 4},
    "merges": [{"method": "average"}, {"method": "ties"}], "compositions": [{"method": "route_oracle"}],
    "baselines": False,
}


def results(run) -> dict:
    """Every evaluation's metric values and predictions, and every adapter's weights, by path."""
    found = {}
    for file in sorted(run.rglob("*")):
        name = file.relative_to(run).as_posix()
        if file.name == "metrics.json":
            found[name] = {k: v["value"] for k, v in io.read_json(file)["metrics"].items()}
        elif file.name in ("predictions.jsonl", "adapter_model.safetensors"):
            found[name] = file.read_bytes()
    return found


def test_two_worker_processes_give_the_serial_run_s_results(tmp_path, small_mirror, capsys):
    config = ExperimentConfig.model_validate({**SMOKE, "data_dir": str(small_mirror)})
    run_experiment(config, tmp_path / "serial", progress=False)
    run_experiment(config, tmp_path / "workers", progress=False, executor=ProcessExecutor(2, threads_per_worker=1))
    serial, workers = results(tmp_path / "serial"), results(tmp_path / "workers")
    assert len(serial) > 20 and serial.keys() == workers.keys()
    assert [name for name in serial if serial[name] != workers[name]] == []


def test_a_failing_cell_stops_the_run_with_its_name(tmp_path, small_mirror):
    config = ExperimentConfig.model_validate({**SMOKE, "data_dir": str(small_mirror), "n_train": {
        "ag_news": 8, "gsm8k": 4}, "train": {**SMOKE["train"], "max_length": 8}})
    with pytest.raises(RuntimeError, match="train .* failed: no training example"):
        run_experiment(config, tmp_path / "run", progress=False, executor=ProcessExecutor(2, threads_per_worker=1))
