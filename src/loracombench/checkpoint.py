"""Resumable training: the trainer's whole state every N optimizer steps, so that a killed run
continues from its last checkpoint and, on CPU, ends with the same bytes as an uninterrupted one.

A run's checkpoints live beside its output folder (which appears only once complete), in
`<out_dir>.checkpoint/step_NNNNNNNN/`. Each step folder is written atomically under a new name, so
a kill at any moment leaves the previous checkpoint, the new one complete, or both (the next start
keeps the newest of its run). Weights are safetensors; optimizer, scheduler and RNG states are
tensors and plain values, saved with torch.save and read back with weights_only=True, which
refuses anything but data: no pickled code is ever run.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import io

WEIGHTS_FILE = "lora.safetensors"
STATE_FILE = "trainer_state.pt"
PROGRESS_FILE = "progress.json"
CHECKPOINT_FILES = {WEIGHTS_FILE, STATE_FILE, PROGRESS_FILE}


STEP_FOLDER = re.compile(r"^step_\d{8}$")


class CheckpointError(RuntimeError):
    """The checkpoint folder beside the output holds something that is not a checkpoint."""


def checkpoint_dir(out_dir: str | Path) -> Path:
    # abspath, not resolve: "." or "x/.." still name a folder with a parent, and a symlinked
    # output keeps its checkpoints beside the link, where the user looks, not beside its target.
    out_dir = Path(os.path.abspath(out_dir))
    return out_dir.parent / f"{out_dir.name}.checkpoint"


def check_checkpoint_dir(out_dir: str | Path) -> None:
    """Refuse a `<out>.checkpoint` that is not a folder of this module's checkpoints (step
    folders and the temporaries of their atomic saves): it is someone's data, and training
    removes the checkpoints it does not resume."""
    _check_root(checkpoint_dir(out_dir))


def _check_root(root: Path) -> None:
    if not root.exists() and not root.is_symlink():
        return
    if root.is_symlink() or not root.is_dir():
        foreign = [root.name]
    else:
        foreign = sorted(entry.name for entry in root.iterdir() if not _ours(entry))
    if foreign:
        raise CheckpointError(f"{root} is where training keeps its checkpoints, but it holds what training "
                              f"did not write ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                              "move it away or choose another output folder")


def _ours(entry: Path) -> bool:
    """A temporary of an atomic save, or a step folder holding checkpoint files only (all of
    them, or fewer where a removal was cut short)."""
    if entry.is_symlink():
        return False
    if io.is_leftover(entry.name):
        return True
    return (entry.is_dir() and STEP_FOLDER.match(entry.name) is not None
            and all(f.name in CHECKPOINT_FILES and f.is_file() and not f.is_symlink() for f in entry.iterdir()))


@dataclass
class Progress:
    """Where a resumed run stands. The step plan is fixed by the seed, so the number of optimizer
    steps done is also the position in the data."""

    step: int
    curve: list[dict]
    train_time_s: float
    # Under torchrun, every rank's random state at the checkpoint (rank 0's is also in "rng"), so
    # that each rank resumes its own dropout stream; None for one process.
    rng_by_rank: list[dict] | None = None


def checkpoint_due(step: int, total_steps: int, every: int) -> bool:
    """Whether step `step` (1-based, just done) is checkpointed: every `every` steps (0: never),
    not after the last, whose adapter is saved next anyway."""
    return bool(every) and step % every == 0 and step < total_steps


class Checkpoints:
    """The checkpoints of one training run, identified by `run_key` (everything that decides its
    steps): another run's checkpoint in the same place is removed, never resumed."""

    def __init__(self, out_dir: str | Path, run_key: str, every: int):
        self.root = checkpoint_dir(out_dir)
        self.run_key = run_key
        self.every = every

    def restore(self, model, optimizer, schedule, scaler=None) -> Progress | None:
        """Load this run's latest checkpoint into the trainer and return its progress; None (and
        nothing changed) when there is none. Everything else in the checkpoint folder goes: other
        runs' checkpoints, older steps, staging folders of killed saves; a folder holding
        anything else is refused (check_checkpoint_dir) before anything is removed."""
        _check_root(self.root)
        latest = self._latest()
        self._remove_all_but(latest)
        if latest is None:
            return None
        try:
            weights, state, progress = _read(latest, model)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError, pickle.UnpicklingError) as err:
            print(f"warning: unreadable training checkpoint {latest} ({err}); training from the start",
                  file=sys.stderr, flush=True)
            self.discard()
            return None
        with torch.no_grad():
            for name, param in _trainable(model).items():
                param.copy_(weights[name])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        load_scaler_state(scaler, state.get("scaler"))
        set_rng_states(state["rng"])
        progress.rng_by_rank = state.get("rng_by_rank")
        return progress

    def save(self, progress: Progress, total_steps: int, model, optimizer, schedule, scaler=None,
             rng_by_rank: list[dict] | None = None) -> None:
        """Checkpoint when checkpoint_due; rng_by_rank: every rank's random state (torchrun)."""
        if not checkpoint_due(progress.step, total_steps, self.every):
            return
        folder = self.root / f"step_{progress.step:08d}"
        with io.atomic_dir(folder) as staging:
            save_file({name: p.detach().cpu().contiguous() for name, p in _trainable(model).items()},
                      staging / WEIGHTS_FILE)
            # The loss scale of fp16 training (empty for a disabled scaler): without it a resumed
            # run restarts at the initial scale and skips other steps than an uninterrupted one.
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else {},
                        "rng": rng_by_rank[0] if rng_by_rank else rng_states(), "rng_by_rank": rng_by_rank},
                       staging / STATE_FILE)
            io.write_json(staging / PROGRESS_FILE, {"run_key": self.run_key, "step": progress.step,
                                                    "train_time_s": progress.train_time_s,
                                                    "loss_curve": progress.curve})
        self._remove_all_but(folder)

    def discard(self) -> None:
        """Remove every checkpoint of the folder, then the folder if that leaves it empty."""
        self._remove_all_but(None)

    def _latest(self) -> Path | None:
        for folder in sorted(self.root.glob("step_*"), reverse=True):
            try:
                if io.read_json(folder / PROGRESS_FILE).get("run_key") == self.run_key:
                    return folder
            except (OSError, ValueError, AttributeError):
                continue
        return None

    def _remove_all_but(self, keep: Path | None) -> None:
        """Remove the folder's checkpoints and temporaries but `keep`; nothing else is touched."""
        if not self.root.is_dir() or self.root.is_symlink():
            return
        for entry in self.root.iterdir():
            if entry == keep or not _ours(entry) or (io.is_leftover(entry.name)
                                                     and not io.is_abandoned_leftover(entry.name)):
                continue  # not ours, or a save another live process is making
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        if keep is None:
            with contextlib.suppress(OSError):
                self.root.rmdir()  # only if empty


def load_scaler_state(scaler, state: dict | None) -> None:
    """A GradScaler's saved state, where both it and the state are for loss scaling (fp16); a
    checkpoint from before the scale was saved leaves the scaler at its start."""
    if scaler is not None and scaler.is_enabled() and state:
        scaler.load_state_dict(state)


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _read(folder: Path, model) -> tuple[dict, dict, Progress]:
    """Everything a checkpoint holds, checked against the model before anything is applied, so
    that a damaged checkpoint leaves the trainer untouched."""
    raw = io.read_json(folder / PROGRESS_FILE)
    progress = Progress(int(raw["step"]), list(raw["loss_curve"]), float(raw["train_time_s"]))
    if len(progress.curve) != progress.step:
        raise ValueError(f"{len(progress.curve)} loss values for {progress.step} steps")
    weights = load_file(folder / WEIGHTS_FILE)
    expected = {name: tuple(p.shape) for name, p in _trainable(model).items()}
    if {name: tuple(t.shape) for name, t in weights.items()} != expected:
        raise ValueError("its LoRA weights do not match the model's")
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    if sum(len(group["params"]) for group in groups) != len(expected):
        raise ValueError("its optimizer state is for another set of parameters")
    return weights, state, progress


def rng_states() -> dict:
    """Every random source a training step draws from: torch's (dropout masks) and Python's."""
    return {"python": random.getstate(), "torch_cpu": torch.get_rng_state(),
            "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch_cpu"])
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(states["torch_cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
