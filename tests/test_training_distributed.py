"""Data-parallel training under torchrun (gloo on CPU): two processes train the adapter one process
trains, from scratch and when resuming a checkpoint, and only rank 0 writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import make_small_mirror, run_subcommand
from loracombench import adapters, training
from loracombench.cli import main
from loracombench.distributed import TORCHRUN_VARIABLES, World

SRC = Path(__file__).resolve().parents[1] / "src"
# 24 AG News rows in micro-batches of 3 (shared 1 and 2 between two ranks), 2 per step: 4 steps.
# Dropout is off: each rank draws its own masks, so with dropout the runs agree in distribution only.
SETTINGS = ["--epochs", "1", "--batch-size", "3", "--grad-accum", "2", "--lora-dropout", "0", "--lr", "5e-3",
            "--max-length", "64", "--lora-rank", "4"]


@pytest.mark.parametrize("n_items", range(0, 8))
@pytest.mark.parametrize("size", [1, 2, 3])
def test_ranks_share_a_micro_batch_in_contiguous_near_equal_parts(n_items, size):
    items = list(range(n_items))
    parts = [World(rank, size).share(items) for rank in range(size)]
    assert sum(parts, []) == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dp")
    make_small_mirror(root / "mirror")
    return root


def train_args(workdir: Path, out: str, checkpoint_every: int = 0) -> list[str]:
    return ["train", "--task", "ag_news", "--model", "tiny-llama", "--data-dir", str(workdir / "mirror"),
            "--device", "cpu", *SETTINGS, "--checkpoint-every", str(checkpoint_every), "--out", str(workdir / out)]


def torchrun(args: list[str], interrupt_dir: Path | None = None) -> None:
    """Two gloo processes; with interrupt_dir (a sitecustomize.py there), both stop mid-run."""
    paths = [str(interrupt_dir)] if interrupt_dir else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "loracombench.cli", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if interrupt_dir:
        assert done.returncode != 0 and "saved adapter to" not in done.stdout, done.stdout[-3000:]
        return
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("saved adapter to") == 1 and "2 processes" in done.stdout


# Every rank stops in the same micro-batch (one rank alone would leave the other in a collective).
STOP_EVERY_RANK = """
from loracombench import training
original, calls = training.batch_loss_sum, []
def stopping(*args, **kwargs):
    calls.append(1)
    if len(calls) == {at}:
        raise KeyboardInterrupt
    return original(*args, **kwargs)
training.batch_loss_sum = stopping
"""


@pytest.fixture(scope="module")
def one_process(workdir) -> dict:
    run_subcommand(train_args(workdir, "one"))
    return load_file(workdir / "one" / adapters.WEIGHTS_FILE)


def assert_same_adapter(trained: dict, reference: dict) -> None:
    assert trained.keys() == reference.keys()
    assert max((trained[k] - reference[k]).abs().max().item() for k in reference) <= 1e-5
    assert max(reference[k].abs().max().item() for k in reference if "lora_B" in k) > 1e-3, "training moved lora_B"


def test_two_processes_train_the_adapter_one_process_trains(workdir, one_process):
    torchrun(train_args(workdir, "two"))
    meta = adapters.read_metadata(workdir / "two")
    assert meta["world_size"] == 2 and meta["steps"] == 4
    assert adapters.read_metadata(workdir / "one")["world_size"] == 1
    assert_same_adapter(load_file(workdir / "two" / adapters.WEIGHTS_FILE), one_process)
    assert sorted(p.name for p in workdir.iterdir() if p.name.startswith("two")) == ["two"]


def test_two_processes_resume_a_checkpoint_and_end_with_the_same_adapter(workdir, one_process, monkeypatch):
    original, calls = training.batch_loss_sum, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # in step 3: steps 1 and 2 are checkpointed
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "batch_loss_sum", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_subcommand(train_args(workdir, "resumed", checkpoint_every=1))
    monkeypatch.undo()
    torchrun(train_args(workdir, "resumed", checkpoint_every=1))
    meta = adapters.read_metadata(workdir / "resumed")
    assert meta["world_size"] == 2 and meta["resumed_from_step"] == 2
    assert_same_adapter(load_file(workdir / "resumed" / adapters.WEIGHTS_FILE), one_process)
    assert not (workdir / "resumed.checkpoint").exists()


def test_with_dropout_a_resumed_two_process_run_ends_with_the_uninterrupted_adapter(workdir, tmp_path):
    """Each rank draws its own dropout masks, so each rank's random state is checkpointed: a rank
    that restarted its stream from the seed would repeat masks it had already drawn."""
    args = [*train_args(workdir, "", checkpoint_every=1)[:-1]]
    args[args.index("--lora-dropout") + 1] = "0.3"
    torchrun([*args, str(tmp_path / "whole")])
    stopper = tmp_path / "stopper"
    stopper.mkdir()
    (stopper / "sitecustomize.py").write_text(STOP_EVERY_RANK.format(at=5))  # in step 3 of 4
    torchrun([*args, str(tmp_path / "resumed")], interrupt_dir=stopper)
    assert (tmp_path / "resumed.checkpoint" / "step_00000002").is_dir()
    torchrun([*args, str(tmp_path / "resumed")])
    assert adapters.read_metadata(tmp_path / "resumed")["resumed_from_step"] == 2
    whole, resumed = (load_file(tmp_path / name / adapters.WEIGHTS_FILE) for name in ("whole", "resumed"))
    assert all(whole[k].equal(resumed[k]) for k in whole)


def test_commands_other_than_train_refuse_torchrun_in_one_line(monkeypatch, capsys):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.setenv(name, "0")
    assert main(["models"]) == 2
    err = capsys.readouterr().err
    assert "`models` does not run data-parallel; under torchrun only `train` does" in err and err.count("\n") == 1
