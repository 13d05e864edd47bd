"""Data-parallel training over the processes that torchrun starts (torch.distributed).

`torchrun --nproc_per_node W -m loracombench.cli train ...` runs W copies of the command. Every
copy plans the same optimizer steps (the plan is seeded); within a step each rank takes its
contiguous share of every micro-batch, divides its token-loss sums by the whole step's target-token
count, and the gradients are summed over the ranks before the update. The sum is the
single-process gradient, so every rank applies the update one process would: the same global
batch, spread over W devices. Only rank 0 writes (checkpoints, the adapter). The backend is nccl
on CUDA (one GPU per local rank) and gloo on CPU. Started without torchrun, nothing changes.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from .checkpoint import load_scaler_state, set_rng_states
from .models import ModelError, pick_device

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether torchrun (or a launcher that sets the same variables) started this process."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel ranks; World() is a plain single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's contiguous part of `items`. The parts are near-equal and, concatenated in
        rank order, give `items` back; a rank gets none when there are fewer items than ranks."""
        return items[len(items) * self.rank // self.size: len(items) * (self.rank + 1) // self.size]

    def device(self, requested: str) -> torch.device:
        """The device this rank trains on: under torchrun, CUDA means the local rank's GPU."""
        device = pick_device(requested)
        if self.size == 1 or device.type != "cuda":
            return device
        if device.index is not None:
            raise ModelError(f"--device {requested!r} under torchrun: each process takes the GPU of its local "
                             f"rank; give --device cuda or auto")
        return torch.device("cuda", self.local_rank)

    def dropout_seed(self, seed: int) -> int:
        """Rank 0 draws the single-process run's dropout masks, every other rank its own stream."""
        return seed if self.is_main else zlib.crc32(f"{seed}:rank{self.rank}".encode("utf-8"))

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Every gradient summed over the ranks, in one all-reduce of one flat buffer; a rank that
        had no example in the step contributes zeros."""
        if self.size == 1:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in parameters])
        dist.all_reduce(flat)
        for param, part in zip(parameters, flat.split([p.numel() for p in parameters])):
            param.grad = part.view_as(param)

    def gather_to_main(self, value) -> list | None:
        """Every rank's `value`, in rank order, on rank 0 (None on the others)."""
        if self.size == 1:
            return [value]
        gathered = [None] * self.size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def sum(self, value: float, device: torch.device) -> float:
        if self.size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return total.item()

    def share_restored_state(self, model, optimizer, schedule, scaler, restored):
        """Rank 0's restored checkpoint (its progress, LoRA weights, optimizer, schedule and loss
        scaler states) given to every rank, which then all start from the same state; returns the
        progress."""
        if self.size == 1:
            return restored
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        payload = [None]
        if self.is_main and restored is not None:
            payload = [{"progress": restored, "weights": {name: p.detach().cpu() for name, p in trainable.items()},
                        "optimizer": _on_cpu(optimizer.state_dict()), "schedule": schedule.state_dict(),
                        "scaler": scaler.state_dict(), "rng_by_rank": _on_cpu(restored.rng_by_rank)}]
        dist.broadcast_object_list(payload, src=0)
        state = payload[0]
        if state is None or self.is_main:
            return restored
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(state["weights"][name])
        optimizer.load_state_dict(state["optimizer"])  # moves the moments onto this rank's device
        schedule.load_state_dict(state["schedule"])
        load_scaler_state(scaler, state["scaler"])
        # This rank's own dropout stream, where the checkpoint holds one per rank of this world.
        if state["rng_by_rank"] is not None and len(state["rng_by_rank"]) == self.size:
            set_rng_states(state["rng_by_rank"][self.rank])
        return state["progress"]


def _on_cpu(state):
    """A state dict with its tensors on the CPU: pickled CUDA tensors would unpickle onto rank 0's GPU."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {key: _on_cpu(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_on_cpu(value) for value in state)
    return state


def current() -> World:
    """The world of the process group in place, else a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


@contextlib.contextmanager
def session(requested_device: str = "auto") -> Iterator[World]:
    """The process group of a command started by torchrun, for the block (nccl when the device is
    CUDA, else gloo); a plain single process otherwise."""
    if not launched() or dist.is_initialized():
        yield current()
        return
    device = pick_device(requested_device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield current()
    finally:
        dist.destroy_process_group()
