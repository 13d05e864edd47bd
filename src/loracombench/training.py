"""LoRA fine-tuning of a base model on one task, with the loss on the target tokens only."""

from __future__ import annotations

import math
import random
import sys
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from . import adapters, distributed, io
from .batching import left_pad, length_grouped_batches
from .checkpoint import Checkpoints, Progress, checkpoint_due, rng_states
from .config import TrainSettings, stable_hash
from .evaluation import encode_pair
from .models import (PROJECTED_LOGITS, LoadedModel, autocast, dtype_name, environment, resolve_dtype,
                     target_modules_for)
from .tasks import Task, get_task

IGNORE_INDEX = -100
# Raised when batch_loss_sum changes what it computes. 2: a row shorter than its batch's longest
# target span lost the targets before its last (span - length) labels (a negative slice start
# wrapped around); no expert of the presets had such a batch, LoRA Soups, LoraHub and multitask
# training did (scripts/lost_targets.py). Part of the cache key of every cell that trains on the
# loss: experts, and the compositions that use it.
TARGET_LOSS_VERSION = 2


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False  # max_length cut the sequence (a sequence of exactly max_length was not)


def encode_example(tokenizer, prompt: str, target: str, max_length: int, eos: bool = True) -> Example | None:
    """Prompt and target split into tokens as scoring splits them (evaluation.encode_pair), the
    target followed by EOS if asked, the prompt masked out of the loss; sequences are cut on the
    right. None when no target token is left. The first token is never a target: nothing
    precedes it to predict it from."""
    prompt_ids, target_ids = encode_pair(tokenizer, prompt, target)
    target_ids = target_ids + ([tokenizer.eos_token_id] if eos else [])
    input_ids = (prompt_ids + target_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + target_ids)[:max_length]
    labels[0] = IGNORE_INDEX
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return Example(input_ids, labels, truncated=len(prompt_ids) + len(target_ids) > max_length)


def encode_rows(tokenizer, task: Task, rows: list[dict], max_length: int) -> list[Example | None]:
    """Each row as the task's prompt and target (encode_example); None where no target is left."""
    return [encode_example(tokenizer, task.prompt(r), task.target(r), max_length, task.target_ends_with_eos)
            for r in rows]


def collate(batch: list[Example], pad_id: int, device="cpu") -> dict[str, torch.Tensor]:
    """Left-padded inputs, plus the labels of the last `keep` positions: every target sits at the
    end of its row, so the vocabulary projection is needed for those positions only."""
    inputs = left_pad([e.input_ids for e in batch], pad_id, device)
    keep = 1 + max(sum(label != IGNORE_INDEX for label in e.labels) for e in batch)
    keep = min(keep, inputs["input_ids"].shape[1])
    labels = torch.full((len(batch), keep - 1), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(batch):
        # max(0, ...): a row shorter than keep - 1 is taken whole; a negative start would wrap
        # around and keep only the row's last labels, dropping targets of the row.
        tail = e.labels[max(0, len(e.labels) - (keep - 1)):] if keep > 1 else []
        labels[row, keep - 1 - len(tail):] = torch.tensor(tail, dtype=torch.long)
    return {**inputs, "labels": labels.to(device), "logits_to_keep": keep}


def batch_loss_sum(model, batch: dict, device, precision: torch.dtype = torch.float32,
                   chunk_tokens: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of the batch's target tokens: from the model's own forward, or with
    chunk_tokens (TrainSettings.loss_chunk_tokens) from chunked_loss_sum. Chunking needs a model
    whose logits are the output projection and nothing more (models.PROJECTED_LOGITS); any other
    takes its own forward."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if chunk_tokens is None or causal_lm.config.model_type not in PROJECTED_LOGITS:
        return forward_loss_sum(model, batch, device, precision)
    return chunked_loss_sum(causal_lm, batch, device, precision, chunk_tokens)


def forward_loss_sum(model, batch: dict, device, precision: torch.dtype) -> torch.Tensor:
    """The loss from the model's forward, which projects the last logits_to_keep positions."""
    with autocast(device, dtype_name(precision)):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], logits_to_keep=batch["logits_to_keep"]).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch["labels"].flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_loss_sum(causal_lm, batch: dict, device, precision: torch.dtype, chunk_tokens: int) -> torch.Tensor:
    """The loss from the decoder's last hidden state at the target positions only, projected
    chunk_tokens at a time, so that no more than one chunk's logits are held. Not bit-identical
    to forward_loss_sum: the projection's shapes differ, and with them MKL's summation order."""
    with autocast(device, dtype_name(precision)):
        hidden = causal_lm.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    targeted = batch["labels"] != IGNORE_INDEX
    # Position t predicts token t + 1: the labels cover the last logits_to_keep positions but one.
    hidden = hidden[:, -batch["logits_to_keep"]:][:, :-1][targeted]
    targets = batch["labels"][targeted]
    head, total = causal_lm.get_output_embeddings(), hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk_tokens):
        chunk = (head, hidden[start: start + chunk_tokens], targets[start: start + chunk_tokens], device, precision)
        # Recomputed in the backward pass, so that its logits are not kept; scoring alone needs no recompute.
        total = total + (checkpoint(projected_loss_sum, *chunk, use_reentrant=False) if torch.is_grad_enabled()
                         else projected_loss_sum(*chunk))
    return total


def projected_loss_sum(head, hidden: torch.Tensor, targets: torch.Tensor, device, precision) -> torch.Tensor:
    with autocast(device, dtype_name(precision)):
        logits = head(hidden)
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")


def lora_config(config: TrainSettings, model_type: str):
    from peft import LoraConfig

    return LoraConfig(
        r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=config.target_modules or target_modules_for(model_type),
        # GPT-2 stores its projections as Conv1D (in, out); PEFT must transpose ΔW for them.
        fan_in_fan_out=model_type == "gpt2", bias="none", task_type="CAUSAL_LM",
    )


def lora_init_seed(config: TrainSettings, task_name: str) -> int:
    """The seed of the adapter's initial lora_A. Derived from the run seed and the task by default,
    so that experts start from independent initialisations: with one shared start their A matrices
    stay close after a short run, and factor averaging then looks far better than it is.
    shared_init=true gives every task the run seed itself (one shared initialisation)."""
    if config.shared_init:
        return config.seed
    return zlib.crc32(f"{config.seed}:{task_name}".encode("utf-8"))


def init_lora(model, config: TrainSettings, task_name: str):
    """The base wrapped in a fresh LoRA, lora_A drawn from the task's init seed (lora_B is zero)."""
    from peft import get_peft_model

    torch.manual_seed(lora_init_seed(config, task_name))
    return get_peft_model(model, lora_config(config, model.config.model_type))


def train_adapter(loaded: LoadedModel, task: Task, rows: list[dict], config: TrainSettings, out_dir: str | Path,
                  device: str = "auto", progress: bool = True, extra_metadata: dict | None = None,
                  dtype: str = "auto") -> dict:
    """Train one LoRA adapter and save it (PEFT format + metadata + loss curve) to out_dir.

    Every config.checkpoint_every steps the whole training state is checkpointed beside out_dir;
    a rerun of the same run resumes from the latest checkpoint, and the checkpoint goes once the
    adapter is saved. Under torchrun the run is data-parallel (see distributed.py)."""
    return train_on_tasks(loaded, [(task, rows)], config, out_dir, device, progress, extra_metadata, dtype)


def train_multitask_adapter(loaded: LoadedModel, rows_by_task: dict[str, list[dict]], config: TrainSettings,
                            out_dir: str | Path, device: str = "auto", progress: bool = True,
                            extra_metadata: dict | None = None, dtype: str = "auto") -> dict:
    """One LoRA trained on the union of several tasks' training rows, each encoded with its own
    task's prompt and target, under the experts' settings: the multi-task reference point of
    composition papers (LoraHub, Huang et al. 2024; LoRA Soups, Prabhakar et al. 2024). The rows
    are mixed in the seeded order of the experts' steps; tasks are taken in name order, so the
    order of `rows_by_task` does not matter."""
    if len(rows_by_task) < 2:
        raise ValueError(f"multitask training needs at least two tasks, got {sorted(rows_by_task)}")
    return train_on_tasks(loaded, multitask_rows(rows_by_task), config, out_dir, device, progress, extra_metadata,
                          dtype)


def multitask_rows(rows_by_task: dict[str, list[dict]]) -> list[tuple[Task, list[dict]]]:
    """The tasks of a multi-task run in name order, each with its rows."""
    return [(get_task(name), rows_by_task[name]) for name in sorted(rows_by_task)]


def training_examples(tokenizer, task_rows: list[tuple[Task, list[dict]]], max_length: int
                      ) -> tuple[dict[str, list[Example | None]], list[Example]]:
    """Each task's rows encoded (None where no target is left), and the examples kept, in task order."""
    encoded = {task.name: encode_rows(tokenizer, task, rows, max_length) for task, rows in task_rows}
    return encoded, [e for examples in encoded.values() for e in examples if e is not None]


def loss_batches(tokenizer, task_rows: list[tuple[Task, list[dict]]], config: TrainSettings) -> list[list[Example]]:
    """Every micro-batch train_on_tasks takes the loss on, in order, without training."""
    return micro_batches(training_examples(tokenizer, task_rows, config.max_length)[1], config)


def train_on_tasks(loaded: LoadedModel, task_rows: list[tuple[Task, list[dict]]], config: TrainSettings,
                   out_dir: str | Path, device: str = "auto", progress: bool = True,
                   extra_metadata: dict | None = None, dtype: str = "auto") -> dict:
    """Train one LoRA on the rows of one or more tasks (see train_adapter); one task is an expert."""
    tokenizer = loaded.tokenizer
    name = "+".join(task.name for task, _ in task_rows)
    encoded, kept = training_examples(tokenizer, task_rows, config.max_length)
    if not kept:
        raise ValueError(f"no training example of {name} fits max_length={config.max_length}")
    identity = {"task": name} if len(task_rows) == 1 else {"tasks": list(encoded)}
    identity["n_train"] = per_task({task: len(examples) for task, examples in encoded.items()})
    world = distributed.current()
    random.seed(config.seed)
    device = world.device(device)
    precision = resolve_dtype(dtype, device)
    model = init_lora(loaded.model, config, name).to(device)
    torch.manual_seed(world.dropout_seed(config.seed))  # dropout masks: the run seed, whatever the initialisation
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = planned_batches(kept, config)
    # Linear decay to zero without warm-up, as transformers' Trainer does by default.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / len(steps))
    # fp16 gradients underflow without loss scaling; for every other precision the scaler is a no-op.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
    checkpoints = Checkpoints(out_dir, run_key(loaded, identity, kept, config, device, precision),
                              config.checkpoint_every if world.is_main else 0)
    resumed = world.share_restored_state(
        model, optimizer, schedule, scaler,
        checkpoints.restore(model, optimizer, schedule, scaler) if world.is_main else None)
    done = resumed or Progress(step=0, curve=[], train_time_s=0.0)
    if resumed and world.is_main:
        print(f"train {name}: resuming at step {resumed.step} of {len(steps)} from {checkpoints.root}",
              file=sys.stderr, flush=True)
    curve, started = done.curve, time.time()
    bar = tqdm(total=len(steps), initial=done.step, desc=f"train {name}", disable=not (progress and world.is_main))
    model.train()
    with activations_recomputed(model, config) as recompute:
        trainer = Trainer(model, optimizer, schedule, scaler, tokenizer.pad_token_id, device, precision, world,
                          recompute, config.loss_chunk_tokens)
        for epoch, step in steps[done.step:]:
            rate = schedule.get_last_lr()[0]  # the rate this step trains at; trainer.step advances it
            loss_sum = trainer.step(step)
            curve.append({"step": len(curve) + 1, "epoch": epoch, "loss": loss_sum, "lr": rate})
            # Under torchrun every rank's random state goes into rank 0's checkpoint: each rank
            # draws its own dropout masks, and a resumed rank must go on with its own stream.
            rng_by_rank = (world.gather_to_main(rng_states())
                           if world.size > 1 and checkpoint_due(len(curve), len(steps), config.checkpoint_every)
                           else None)
            checkpoints.save(Progress(len(curve), curve, done.train_time_s + time.time() - started), len(steps),
                             model, optimizer, schedule, scaler, rng_by_rank)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}")
    bar.close()
    model.eval()
    elapsed = done.train_time_s + time.time() - started
    metadata = {
        "kind": "trained", **identity, "base_model": loaded.fingerprint,
        "config": config.model_dump(), "seed": config.seed, "init_seed": lora_init_seed(config, name),
        **example_counts(encoded),
        "train_time_s": round(elapsed, 2), "steps": len(curve),
        "final_loss": curve[-1]["loss"], "device": str(device), "dtype": dtype_name(precision),
        "world_size": world.size, "environment": environment(device),
        "resumed_from_step": resumed.step if resumed else None, **(extra_metadata or {}),
    }
    if world.is_main:
        model.peft_config["default"].base_model_name_or_path = loaded.path
        adapters.save_peft_model(model, out_dir, metadata, extra_files={
            "loss_curve.json": lambda path: io.write_json(path, curve),
            "loss_curve.png": lambda path: plot_loss_curve(curve, name, path),
        })
        checkpoints.discard()
    return metadata


@dataclass
class Recompute:
    """Which decoder layers recompute their activations in the backward pass (gradient
    checkpointing), decided per micro-batch from its size. Saved activations grow with the tokens
    times the layers that keep them, so a micro-batch of t > above_tokens tokens recomputes the
    first ceil(L * (1 - above_tokens / t)) of its L layers and keeps at most above_tokens tokens'
    worth. Written here, not taken from transformers, whose switch is all layers or none."""

    layers: list[torch.nn.Module]
    every_layer: bool = False
    above_tokens: int | None = None

    def layers_for(self, tokens: int) -> int:
        if self.every_layer:
            return len(self.layers)
        if self.above_tokens is None or tokens <= self.above_tokens:
            return 0
        return math.ceil(len(self.layers) * (1 - self.above_tokens / tokens))

    def prepare(self, tokens: int) -> None:
        recomputed = self.layers_for(tokens)
        for index, layer in enumerate(self.layers):
            layer.gradient_checkpointing = index < recomputed


@contextmanager
def activations_recomputed(model, config: TrainSettings):
    """Gradient checkpointing as config asks, for the duration of a training run, then off again:
    the base model is shared with the evaluation that follows. Non-reentrant, which replays the
    layer's RNG state, so dropout masks and hence the adapter are the same as without it."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not config.gradient_checkpointing and config.recompute_above_tokens is None:
        yield Recompute([])
        return
    base = model.get_base_model()
    base.activation_checkpointing_enable({"use_reentrant": False})
    # transformers also hooks the embeddings to make their output require grad, which only
    # reentrant checkpointing needs; left on, every backward would run into layer 0's inputs too.
    base.disable_input_require_grads()
    layers = [module for module in base.modules() if isinstance(module, GradientCheckpointingLayer)]
    try:
        yield Recompute(layers, config.gradient_checkpointing, config.recompute_above_tokens)
    finally:
        base.activation_checkpointing_disable()


def per_task(counts: dict[str, int]) -> int | dict[str, int]:
    """A count as metadata records it: a number for an expert, a number per task for a multi-task run."""
    return next(iter(counts.values())) if len(counts) == 1 else counts


def example_counts(encoded: dict[str, list[Example | None]]) -> dict:
    """How many examples each task's training used (the others had no target token left) and how
    many of those max_length cut."""
    used = {task: [e for e in examples if e is not None] for task, examples in encoded.items()}
    return {"n_used": per_task({task: len(examples) for task, examples in used.items()}),
            "n_truncated": per_task({task: sum(e.truncated for e in examples)
                                     for task, examples in used.items()})}


@dataclass
class Trainer:
    """What an optimizer step needs, on this rank."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    pad_id: int
    device: torch.device
    precision: torch.dtype
    world: distributed.World
    recompute: Recompute = field(default_factory=lambda: Recompute([]))
    loss_chunk_tokens: int | None = None

    def step(self, micro_batches: list[list[Example]]) -> float:
        """One update from its micro-batches; returns the update's mean target-token loss. Each rank
        computes its share of every micro-batch."""
        n_target = sum(sum(label != IGNORE_INDEX for label in e.labels) for batch in micro_batches for e in batch)
        loss_sum = 0.0
        for examples in micro_batches:
            mine = self.world.share(examples)
            if not mine:
                continue
            batch = collate(mine, self.pad_id, self.device)
            self.recompute.prepare(batch["input_ids"].numel())
            # Divided by the whole update's token count, so that gradient accumulation (and the
            # sum over ranks) gives the same step as one large batch.
            loss = batch_loss_sum(self.model, batch, self.device, self.precision, self.loss_chunk_tokens) / n_target
            self.scaler.scale(loss).backward()
            loss_sum += loss.item()
        self.world.sum_gradients([p for p in self.model.parameters() if p.requires_grad])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.world.sum(loss_sum, self.device)


def run_key(loaded: LoadedModel, identity: dict, kept: list[Example], config: TrainSettings,
            device: torch.device, precision: torch.dtype) -> str:
    """Everything that decides this run's steps: only a checkpoint with this key is resumed."""
    return stable_hash({"base": loaded.fingerprint, **identity,
                        "examples": [[e.input_ids, e.labels] for e in kept],
                        "train": config.result_settings(), "device": device.type, "dtype": dtype_name(precision)})


def plan_steps(kept: list[Example], config: TrainSettings) -> list[tuple[int, list[list[int]]]]:
    """Every optimizer step of the run, as (epoch, micro-batches of example indices), seeded."""
    rng = random.Random(config.seed)
    steps = []
    for epoch in range(1, config.epochs + 1):
        if config.group_by_length:
            batches = length_grouped_batches([len(e.input_ids) for e in kept], config.batch_size, rng)
        else:
            order = rng.sample(range(len(kept)), len(kept))
            batches = [order[i: i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        steps += [(epoch, batches[i: i + config.grad_accum]) for i in range(0, len(batches), config.grad_accum)]
    return steps


def planned_batches(examples: list[Example], config: TrainSettings) -> list[tuple[int, list[list[Example]]]]:
    """plan_steps with the examples themselves: every step as (epoch, its micro-batches)."""
    return [(epoch, [[examples[i] for i in chunk] for chunk in step]) for epoch, step in plan_steps(examples, config)]


def micro_batches(examples: list[Example], config: TrainSettings) -> list[list[Example]]:
    """The examples of every micro-batch of plan_steps, in order."""
    return [batch for _, step in planned_batches(examples, config) for batch in step]


def plot_loss_curve(curve: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([c["step"] for c in curve], [c["loss"] for c in curve], marker="." if len(curve) < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean target-token cross-entropy")
    ax.set_title(f"LoRA training loss: {title}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with io.atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
