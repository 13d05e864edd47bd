"""Executors: a run's cells spread over Ray workers give the serial run's results."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from loracombench.cli import main
from loracombench.config import ExperimentConfig
from loracombench import adapters
from loracombench.pipeline import Cell, Experiment
from test_pipeline_and_cli import SMOKE, write_config


def test_copies_of_one_run_arriving_in_a_process_are_one_experiment_without_the_model(tmp_path, small_mirror):
    from loracombench.executors import ProcessExecutor

    experiment = Experiment(ExperimentConfig(**{**SMOKE, "data_dir": str(small_mirror)}), tmp_path / "run",
                            executor=ProcessExecutor(2))
    experiment.shared  # this process's model lives beside the run (pipeline._SHARED_BASES), never in it
    first, second = (pickle.loads(pickle.dumps(experiment)) for _ in range(2))
    assert first is second and first is not experiment
    assert first.executor is None and first.config == experiment.config and first.out == experiment.out
    assert not any(isinstance(value, adapters.SharedBase) for value in vars(first).values())
    other = Experiment(experiment.config, tmp_path / "run")
    assert pickle.loads(pickle.dumps(other)) is not first


def test_ray_executor_without_ray_names_the_extra_and_writes_nothing(tmp_path, small_mirror, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out = tmp_path / "run"
    argv = ["run", "--config", str(write_config(tmp_path)), "--data-dir", str(small_mirror), "--out", str(out)]
    assert main([*argv, "--executor", "ray"]) == 2
    assert "pip install 'loracombench[ray]'" in capsys.readouterr().err
    assert main([*argv, "--ray-address", "auto"]) == 2
    assert "--ray-address is for --executor ray" in capsys.readouterr().err
    assert not out.exists()


def test_the_cells_that_run_the_base_model_ask_for_a_gpu_and_no_other_does(tmp_path, small_mirror):
    """What the Ray executor gives a GPU (when the cluster has one): training and evaluation ask,
    a static merge (weights only) and a classical baseline do not."""
    from loracombench.executors import SerialExecutor

    asked = {}

    class Recording(SerialExecutor):
        def run(self, cells) -> None:
            asked.update({cell.what.split(" ")[0]: cell.gpu for cell in cells})
            super().run(cells)

    config = ExperimentConfig(**{**SMOKE, "baselines": True, "data_dir": str(small_mirror)})
    Experiment(config, tmp_path / "run", progress=False, executor=Recording()).run()
    assert asked == {"train": True, "merge": False, "eval": True, "baseline": False}, asked


def test_a_serial_run_loads_the_base_model_once(tmp_path, small_mirror, monkeypatch):
    """Every cell (two experts, a merge, eight evaluations, six baselines) borrows one loaded base."""
    from loracombench import pipeline

    loads = []
    real = pipeline.load_model
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    monkeypatch.setattr(pipeline, "_SHARED_BASES", {})  # as in a fresh process: no base from other tests
    config = ExperimentConfig(**{**SMOKE, "baselines": True, "data_dir": str(small_mirror)})
    Experiment(config, tmp_path / "run", progress=False).run()
    assert len(loads) == 1 and len(list((tmp_path / "run" / "eval").glob("*/*/metrics.json"))) == 8 + 6


def test_without_an_address_the_ray_executor_starts_its_own_ray_whatever_is_running(tmp_path):
    """As --ray-address's help says: plain ray.init() would join a Ray already running on the
    machine (or named by RAY_ADDRESS; here one that does not answer) and refuse num_cpus there."""
    pytest.importorskip("ray")
    started = subprocess.run(
        [sys.executable, "-c", "from loracombench.executors import RayExecutor\n"
         "executor = RayExecutor(num_cpus=1, include_dashboard=False)\n"
         "print('cpus', executor._connect().cluster_resources()['CPU'])\nexecutor.close()"],
        env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr[-2000:]
    assert "cpus 1.0" in started.stdout


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    sigterm = signal.getsignal(signal.SIGTERM)  # ray.init replaces it and shutdown leaves its own
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()
    signal.signal(signal.SIGTERM, sigterm)


def eval_results(run) -> dict:
    results = {}
    for folder in sorted((run / "eval").glob("*/*")):
        name = str(folder.relative_to(run))
        results[name] = (json.loads((folder / "metrics.json").read_text())["metrics"],
                         (folder / "predictions.jsonl").read_bytes())
    return results


def weights(run) -> dict:
    return {str(path.relative_to(run)): load_file(path) for path in sorted(run.glob("*/seed0/**/*.safetensors"))}


def test_a_run_on_local_ray_equals_the_serial_run(tmp_path, small_mirror, local_ray, capsys):
    config = write_config(tmp_path)
    runs = {name: tmp_path / name for name in ("serial", "ray")}
    for name, out in runs.items():
        argv = ["run", "--config", str(config), "--data-dir", str(small_mirror), "--out", str(out)]
        assert main([*argv, "--executor", name]) == 0
    capsys.readouterr()
    serial, spread = (eval_results(run) for run in runs.values())
    assert len(serial) == 4 * 2 and serial.keys() == spread.keys()
    for name in serial:
        assert serial[name] == spread[name], name
    expected, found = (weights(run) for run in runs.values())
    assert {"adapters/seed0/ag_news/adapter_model.safetensors", "merges/seed0/average/adapter/adapter_model.safetensors"} \
        <= expected.keys() == found.keys()
    for name, tensors in expected.items():
        assert tensors.keys() == found[name].keys()
        assert all(tensors[module].equal(found[name][module]) for module in tensors), name


def test_a_failing_cell_stops_the_stage_with_its_name(tmp_path, local_ray):
    from loracombench.executors import RayExecutor

    def fail():
        raise ValueError("no such adapter")

    cell = Cell("train broken (seed 0)", tmp_path / "broken", "key", fail)
    with pytest.raises(RuntimeError, match=r"^train broken \(seed 0\): ValueError: no such adapter"):
        RayExecutor().run([cell])
    assert not (tmp_path / "broken").exists()


def test_a_ray_run_hands_its_workers_absolute_paths_to_a_local_model_and_the_data(tmp_path, small_mirror,
                                                                                 monkeypatch):
    """Ray workers on other machines resolve a relative path against their own folder."""
    from loracombench import executors, models, pipeline

    model = tmp_path / "my-model"
    models.load_model("tiny-llama").model.save_pretrained(model)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(executors, "make_executor", lambda *args: executors.SerialExecutor())
    given = {}

    def run_experiment(config, out, **kwargs):
        given.update(config=config, out=out)
        raise KeyboardInterrupt  # nothing runs

    monkeypatch.setattr(pipeline, "run_experiment", run_experiment)
    data = small_mirror.relative_to(tmp_path)  # the fixture's mirror lies in tmp_path
    argv = ["run", "--config", "smoke", "--model", "my-model", "--data-dir", str(data), "--out", "run"]
    assert main([*argv, "--executor", "ray"]) == 130  # stopped as by Ctrl-C, once the paths were handed over
    assert given["config"].model == str(model) and given["out"] == tmp_path / "run"
    assert given["config"].data_dir == str(small_mirror)
