"""Ray gives each GPU cell a fresh worker: the worker frees the GPU's memory when it exits, and
never keeps a base model loaded on a GPU that Ray has since handed to another task."""

from __future__ import annotations

import signal

import pytest

from loracombench.pipeline import Cell


@pytest.fixture(scope="module")
def ray_with_gpus():
    """A local Ray that believes it has two GPUs (Ray schedules by the count; nothing runs on them)."""
    ray = pytest.importorskip("ray")
    sigterm = signal.getsignal(signal.SIGTERM)  # ray.init replaces it and shutdown leaves its own
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()
    signal.signal(signal.SIGTERM, sigterm)


def pid_cell(folder, gpu: bool) -> Cell:
    def compute():
        import os

        import ray

        folder.mkdir(parents=True, exist_ok=True)
        (folder / "pid").write_text(str(os.getpid()))
        (folder / "gpus").write_text(",".join(str(i) for i in ray.get_gpu_ids()))

    return Cell(f"pid {folder.name}", folder, "key", compute, gpu=gpu)


def test_each_gpu_cell_runs_in_a_fresh_ray_worker(tmp_path, ray_with_gpus):
    from loracombench.executors import RayExecutor

    folders = [tmp_path / f"gpu{i}" for i in range(4)]
    RayExecutor(cpus_per_cell=0.5).run([pid_cell(folder, gpu=True) for folder in folders])
    pids = [int((folder / "pid").read_text()) for folder in folders]
    assert len(set(pids)) == len(pids), pids


def test_a_cell_that_runs_the_model_is_given_one_gpu_and_any_other_none(tmp_path, ray_with_gpus):
    from loracombench.executors import RayExecutor

    cells = {"model": pid_cell(tmp_path / "model", gpu=True), "merge": pid_cell(tmp_path / "merge", gpu=False)}
    RayExecutor(cpus_per_cell=0.5).run(list(cells.values()))
    given = {name: (cell.folder / "gpus").read_text() for name, cell in cells.items()}
    assert len(given["model"].split(",")) == 1 and given["model"] != "" and given["merge"] == "", given
