"""Checkpointed training: a killed or interrupted run resumes from its last checkpoint and, on CPU,
ends with exactly the bytes and loss curve of an uninterrupted run; another run's checkpoint is
never resumed; checkpoints are written only when asked and removed once the adapter is saved."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loracombench import adapters, checkpoint, training
from loracombench.checkpoint import checkpoint_dir
from loracombench.config import TrainSettings
from loracombench.models import load_model
from loracombench.tasks import get_task

ROWS = [{"text": f"{w} story number {i}", "label": y}
        for i in range(3) for y, w in enumerate(["war", "goal", "stocks", "chip"])]
# 12 rows, micro-batches of 2, 2 per update: 3 optimizer steps an epoch, 6 in all.
SETTINGS = dict(r=4, epochs=2, batch_size=2, grad_accum=2, max_length=64, learning_rate=5e-3, lora_dropout=0.1)
EVERY = 2
STEPS = 6
MICRO_BATCHES = STEPS * SETTINGS["grad_accum"]
REPO = Path(__file__).resolve().parents[1]


def train(out: Path, model: str = "tiny-llama", rows=ROWS, checkpoint_every: int = EVERY, **overrides) -> dict:
    config = TrainSettings(**{**SETTINGS, **overrides}, checkpoint_every=checkpoint_every)
    return training.train_adapter(load_model(model), get_task("ag_news"), rows, config, out, progress=False)


def result(out: Path) -> tuple[bytes, list]:
    return (out / adapters.WEIGHTS_FILE).read_bytes(), json.loads((out / "loss_curve.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train several times faster on one thread on a busy 2-core machine (no OpenMP
    workers spinning for a core), and the killed child is given the same count (kill_child_run)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Each model's adapter bytes and loss curve from one run without checkpoints."""
    cache = {}

    def get(model: str = "tiny-llama") -> tuple[bytes, list]:
        if model not in cache:
            out = tmp_path_factory.mktemp(model) / "adapter"
            train(out, model, checkpoint_every=0)
            cache[model] = result(out)
        return cache[model]

    return get


def interrupt_at_micro_batch(monkeypatch, n: int) -> None:
    """Ctrl-C during the n-th forward pass (1-based) of the next training run."""
    original, calls = training.batch_loss_sum, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "batch_loss_sum", interrupted)


def saved_steps(out: Path) -> list[str]:
    root = checkpoint_dir(out)
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# ---------------------------------------------------------------- SIGKILL in a child process

def kill_child_run(out: Path, model: str, function: str, at: int) -> None:
    """Run training in a fresh interpreter on this worktree's code, SIGKILLed right after the
    at-th call of training.batch_loss_sum (mid step) or checkpoint.save_file (mid checkpoint)."""
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); import test_training_checkpoint as t; "
            f"t.killed_run({str(out)!r}, {model!r}, {function!r}, {at}, {torch.get_num_threads()})")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    child = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]


def killed_run(out: str, model: str, function: str, at: int, threads: int) -> None:
    """The child's side of kill_child_run. Same thread count as the parent: CPU reductions are
    bit-reproducible only with the same split of the work."""
    torch.set_num_threads(threads)
    module = training if function == "batch_loss_sum" else checkpoint
    original, calls = getattr(module, function), []

    def killing(*args, **kwargs):
        value = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return value

    setattr(module, function, killing)
    train(Path(out), model)


def test_a_run_killed_at_a_random_step_resumes_to_the_uninterrupted_bytes(tmp_path, uninterrupted):
    """Killed in any forward pass after the first checkpoint (before it, a rerun simply starts
    over: see the checkpoint_every=0 case below)."""
    seed = int(os.environ.get("LORACOMBENCH_KILL_SEED", random.randrange(10**6)))
    kill_at = random.Random(seed).randint(EVERY * SETTINGS["grad_accum"] + 1, MICRO_BATCHES)
    print(f"LORACOMBENCH_KILL_SEED={seed}: SIGKILL in forward pass {kill_at} of {MICRO_BATCHES}")
    out = tmp_path / "adapter"
    kill_child_run(out, "tiny-llama", "batch_loss_sum", kill_at)
    steps_done = math.ceil(kill_at / SETTINGS["grad_accum"]) - 1
    last_checkpoint = steps_done // EVERY * EVERY
    assert saved_steps(out) == [f"step_{last_checkpoint:08d}"], f"seed {seed}"
    assert not out.exists()

    meta = train(out)
    assert meta["resumed_from_step"] == last_checkpoint, f"seed {seed}"
    assert result(out) == uninterrupted(), f"seed {seed}"
    assert not checkpoint_dir(out).exists()


def test_a_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, uninterrupted):
    out = tmp_path / "adapter"
    kill_child_run(out, "tiny-llama", "save_file", 2)  # the weights of the step-4 checkpoint are written
    left = saved_steps(out)
    assert left[0].startswith(".step_00000004.") and left[0].endswith(".partial")
    assert left[1:] == ["step_00000002"]

    assert train(out)["resumed_from_step"] == 2
    assert result(out) == uninterrupted()
    assert not checkpoint_dir(out).exists()


# ---------------------------------------------------------------- in-process interruptions

@pytest.mark.parametrize("model, every, left", [("tiny-llama", 0, []), ("tiny-gpt2", 3, ["step_00000003"])])
def test_checkpoints_are_written_only_when_asked_and_gone_after_success(tmp_path, monkeypatch, uninterrupted,
                                                                       model, every, left):
    out = tmp_path / "adapter"
    interrupt_at_micro_batch(monkeypatch, 2 * 4 + 1)  # during step 5
    with pytest.raises(KeyboardInterrupt):
        train(out, model, checkpoint_every=every)
    assert saved_steps(out) == left
    monkeypatch.undo()
    # How often to checkpoint does not change the run: a checkpoint resumes under another interval.
    meta = train(out, model, checkpoint_every=EVERY)
    assert meta["resumed_from_step"] == (int(left[0][5:]) if left else None)
    assert result(out) == uninterrupted(model)
    assert not checkpoint_dir(out).exists()


@pytest.mark.parametrize("change", [{"learning_rate": 1e-2}, {"rows": ROWS[:11]}])
def test_a_checkpoint_of_another_run_is_removed_not_resumed(tmp_path, monkeypatch, uninterrupted, change):
    out = tmp_path / "adapter"
    interrupt_at_micro_batch(monkeypatch, 2 * 4 + 1)
    with pytest.raises(KeyboardInterrupt):
        train(out, **change)
    assert saved_steps(out) == ["step_00000004"]
    monkeypatch.undo()
    meta = train(out)
    assert meta["resumed_from_step"] is None
    assert result(out) == uninterrupted()
    assert not checkpoint_dir(out).exists()


def test_a_damaged_checkpoint_is_reported_and_training_starts_over(tmp_path, monkeypatch, capsys, uninterrupted):
    out = tmp_path / "adapter"
    interrupt_at_micro_batch(monkeypatch, 2 * 4 + 1)
    with pytest.raises(KeyboardInterrupt):
        train(out)
    monkeypatch.undo()
    weights = checkpoint_dir(out) / "step_00000004" / checkpoint.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    meta = train(out)
    assert "unreadable training checkpoint" in capsys.readouterr().err
    assert meta["resumed_from_step"] is None
    assert result(out) == uninterrupted()


def test_checkpoint_interval_is_validated_and_outside_the_settings_that_decide_the_adapter():
    with pytest.raises(ValueError, match="checkpoint_every"):
        TrainSettings(checkpoint_every=-1)
    assert TrainSettings(checkpoint_every=0).result_settings() == TrainSettings(checkpoint_every=7).result_settings()
    assert TrainSettings(seed=1).result_settings() != TrainSettings().result_settings()


# ---------------------------------------------------------------- a user's folder in the way

@pytest.mark.parametrize("every", [0, EVERY])
def test_a_users_folder_where_checkpoints_go_is_refused_and_left_as_it_was(tmp_path, every):
    """Training removes the checkpoints it does not resume, so a `<out>.checkpoint` holding
    anything else (here a file, and a step-like folder with a file training never writes) is
    refused before anything is touched, with checkpointing on or off."""
    out = tmp_path / "my_adapter"
    root = checkpoint_dir(out)
    (root / "step_00000001").mkdir(parents=True)
    (root / "step_00000001" / "notes.txt").write_text("mine")
    (root / "data.csv").write_text("precious")
    with pytest.raises(checkpoint.CheckpointError, match=r"my_adapter\.checkpoint is where training keeps its "
                                                         r"checkpoints, but it holds what training did not write "
                                                         r"\(data\.csv, step_00000001\)"):
        train(out, checkpoint_every=every)
    assert (root / "data.csv").read_text() == "precious" and (root / "step_00000001" / "notes.txt").exists()
    assert not out.exists()


def test_the_train_command_refuses_that_folder_before_loading_the_model(tmp_path, small_mirror, capsys,
                                                                       monkeypatch):
    from loracombench import cli, models

    root = tmp_path / "my_adapter.checkpoint"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code = cli.main(["train", "--task", "ag_news", "--model", "tiny-llama", "--data-dir", str(small_mirror),
                     "--n-train", "8", "--out", str(tmp_path / "my_adapter")])
    assert code != 0 and "holds what training did not write (notes.txt)" in capsys.readouterr().err
    assert (root / "notes.txt").read_text() == "mine"


def test_what_a_cut_short_removal_left_is_still_recognised_as_a_checkpoint(tmp_path, uninterrupted):
    out = tmp_path / "adapter"
    step = checkpoint_dir(out) / "step_00000004"
    step.mkdir(parents=True)
    (step / checkpoint.WEIGHTS_FILE).write_bytes(b"half of a removed checkpoint")
    assert train(out)["resumed_from_step"] is None
    assert result(out) == uninterrupted()
    assert not checkpoint_dir(out).exists()


def test_a_symlinked_output_keeps_its_checkpoints_beside_the_link(tmp_path):
    target = tmp_path / "elsewhere" / "real"
    target.parent.mkdir()
    link = tmp_path / "adapter"
    link.symlink_to(target, target_is_directory=True)
    assert checkpoint_dir(link) == tmp_path / "adapter.checkpoint"


def test_a_checkpoint_carries_the_fp16_loss_scale_to_the_resumed_run(tmp_path):
    """fp16 training skips the steps whose gradients overflow and adapts its loss scale; a resumed
    run must continue from the saved scale, not restart at the initial one. A CPU GradScaler
    stands in for CUDA's (fp16 training itself needs CUDA)."""
    model = load_model("tiny-llama").model
    training.init_lora(model, TrainSettings(r=4), "ag_news")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=3)
    scaler.scale(torch.tensor(1.0))  # the scale is made on first use
    scaler.update(new_scale=1234.0)
    saved = checkpoint.Checkpoints(tmp_path / "adapter", "run", every=1)
    saved.save(checkpoint.Progress(1, [{"loss": 1.0}], 0.0), 5, model, optimizer, schedule, scaler)
    resumed_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=3)
    assert saved.restore(model, optimizer, schedule, resumed_scaler).step == 1
    assert resumed_scaler.get_scale() == 1234.0
    # A disabled scaler (every precision but fp16) saves nothing and loads nothing.
    saved.save(checkpoint.Progress(2, [{"loss": 1.0}] * 2, 0.0), 5, model, optimizer, schedule,
               torch.amp.GradScaler("cpu", enabled=False))
    assert saved.restore(model, optimizer, schedule, torch.amp.GradScaler("cpu", enabled=False)).step == 2


def test_a_checkpoint_another_live_process_is_saving_is_left_alone(tmp_path, uninterrupted):
    """Two processes on one checkpoint folder (a killed driver's worker still finishing) must not
    remove each other's saves in progress: only abandoned temporaries go."""
    out = tmp_path / "adapter"
    root = checkpoint_dir(out)
    live = root / f".step_00000002.{os.getpid()}-abcdefgh.partial"
    dead = root / ".step_00000002.999999999-abcdefgh.partial"
    for staging in (live, dead):
        staging.mkdir(parents=True)
    assert train(out)["resumed_from_step"] is None
    assert result(out) == uninterrupted()
    assert live.is_dir() and not dead.exists()
