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
    # ...and the executor does run its cells in other processes (an in-process loop would pass the above).
    import os

    folders = [tmp_path / "pid_a", tmp_path / "pid_b"]
    ProcessExecutor(2, threads_per_worker=1).run([sleeping_cell(folder, 0) for folder in folders])
    assert os.getpid() not in worker_pids(folders)


def test_a_failing_cell_stops_the_run_with_its_name(tmp_path, small_mirror):
    config = ExperimentConfig.model_validate({**SMOKE, "data_dir": str(small_mirror), "n_train": {
        "ag_news": 8, "gsm8k": 4}, "train": {**SMOKE["train"], "max_length": 8}})
    with pytest.raises(RuntimeError, match="train .* failed: no training example"):
        run_experiment(config, tmp_path / "run", progress=False, executor=ProcessExecutor(2, threads_per_worker=1))


def sleeping_cell(folder, seconds: float):
    """A cell that records its worker's pid, then works for `seconds`."""
    import os
    import time

    from loracombench.pipeline import Cell

    def compute():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "pid").write_text(str(os.getpid()))
        time.sleep(seconds)

    return Cell(f"sleep in {folder.name}", folder, "key", compute)


def alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def worker_pids(folders, timeout: float = 60) -> list[int]:
    import time

    deadline = time.time() + timeout
    while not all((f / "pid").is_file() for f in folders):
        assert time.time() < deadline, "the workers never started their cells"
        time.sleep(0.1)
    return [int((f / "pid").read_text()) for f in folders]


def gone(pids: list[int], timeout: float = 10) -> bool:
    import time

    deadline = time.time() + timeout
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    return not any(alive(pid) for pid in pids)


def test_ctrl_c_or_sigterm_stops_the_workers_cells_at_once_instead_of_waiting_for_them(tmp_path):
    import os
    import signal
    import threading
    import time

    folders = [tmp_path / "a", tmp_path / "b"]
    executor = ProcessExecutor(2, threads_per_worker=1)
    pids = []
    threading.Thread(target=lambda: (pids.extend(worker_pids(folders)), os.kill(os.getpid(), signal.SIGINT)),
                     daemon=True).start()
    started = time.time()
    with pytest.raises(KeyboardInterrupt):
        executor.run([sleeping_cell(folder, 120) for folder in folders])
    assert time.time() - started < 60  # not the cells' 120 s
    assert gone(pids)
    assert not any((f / "cell_manifest.json").exists() for f in folders)  # nothing looks complete
    executor.close()


def test_the_workers_of_a_killed_driver_do_not_outlive_it(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    folder = tmp_path / "cell"
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from pathlib import Path; "
            "from test_process_executor import sleeping_cell; from loracombench.executors import ProcessExecutor; "
            "ProcessExecutor(1, threads_per_worker=1).run([sleeping_cell(Path(sys.argv[1]), 120)])")
    driver = subprocess.Popen([sys.executable, "-c", code, str(folder), str(Path(__file__).parent)],
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    try:
        [pid] = worker_pids([folder])
        assert alive(pid)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert gone([pid])
