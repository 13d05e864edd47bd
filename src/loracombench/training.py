"""LoRA fine-tuning of a base model on one task, with the loss on the target tokens only."""

from __future__ import annotations

import random
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import adapters, io
from .batching import left_pad, length_grouped_batches
from .checkpoint import Checkpoints, Progress
from .config import TrainSettings, stable_hash
from .models import LoadedModel, autocast, pick_device, target_modules_for
from .tasks import Task

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def encode_example(tokenizer, prompt: str, target: str, max_length: int, eos: bool = True) -> Example | None:
    """Prompt and target tokenised separately (as scoring does), the target followed by EOS if
    asked, the prompt masked out of the loss; sequences are cut on the right. None when no target
    token is left. The first token is never a target: nothing precedes it to predict it from."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])
    input_ids = (prompt_ids + target_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + target_ids)[:max_length]
    labels[0] = IGNORE_INDEX
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return Example(input_ids, labels)


def collate(batch: list[Example], pad_id: int, device="cpu") -> dict[str, torch.Tensor]:
    """Left-padded inputs, plus the labels of the last `keep` positions: every target sits at the
    end of its row, so the vocabulary projection is needed for those positions only."""
    inputs = left_pad([e.input_ids for e in batch], pad_id, device)
    keep = 1 + max(sum(label != IGNORE_INDEX for label in e.labels) for e in batch)
    keep = min(keep, inputs["input_ids"].shape[1])
    labels = torch.full((len(batch), keep - 1), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(batch):
        tail = e.labels[len(e.labels) - (keep - 1):] if keep > 1 else []
        labels[row, keep - 1 - len(tail):] = torch.tensor(tail, dtype=torch.long)
    return {**inputs, "labels": labels.to(device), "logits_to_keep": keep}


def batch_loss_sum(model, batch: dict, device) -> torch.Tensor:
    """Summed cross-entropy of the batch's target tokens."""
    with autocast(device):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], logits_to_keep=batch["logits_to_keep"]).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch["labels"].flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


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
                  device: str = "auto",
                  progress: bool = True, extra_metadata: dict | None = None) -> dict:
    """Train one LoRA adapter and save it (PEFT format + metadata + loss curve) to out_dir.

    Every config.checkpoint_every steps the whole training state is checkpointed beside out_dir;
    a rerun of the same run resumes from the latest checkpoint, and the checkpoint goes once the
    adapter is saved."""
    tokenizer = loaded.tokenizer
    examples = [encode_example(tokenizer, task.prompt(r), task.target(r), config.max_length, task.target_ends_with_eos)
                for r in rows]
    kept = [e for e in examples if e is not None]
    if not kept:
        raise ValueError(f"no training example of {task.name} fits max_length={config.max_length}")
    random.seed(config.seed)
    device = pick_device(device)
    model = init_lora(loaded.model, config, task.name).to(device)
    torch.manual_seed(config.seed)  # dropout masks: the run seed, whatever the initialisation
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = plan_steps(kept, config)
    # Linear decay to zero without warm-up, as transformers' Trainer does by default.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / len(steps))
    checkpoints = Checkpoints(out_dir, run_key(loaded, task, len(rows), kept, config, device), config.checkpoint_every)
    resumed = checkpoints.restore(model, optimizer, schedule)
    done = resumed or Progress(step=0, curve=[], train_time_s=0.0)
    if resumed:
        print(f"train {task.name}: resuming at step {resumed.step} of {len(steps)} from {checkpoints.root}",
              file=sys.stderr, flush=True)
    curve, started = done.curve, time.time()
    bar = tqdm(total=len(steps), initial=done.step, desc=f"train {task.name}", disable=not progress)
    model.train()
    for epoch, step in steps[done.step:]:
        loss_sum = optimizer_step(model, optimizer, schedule, [[kept[i] for i in chunk] for chunk in step],
                                  tokenizer.pad_token_id, device)
        curve.append({"step": len(curve) + 1, "epoch": epoch, "loss": loss_sum, "lr": schedule.get_last_lr()[0]})
        checkpoints.save(Progress(len(curve), curve, done.train_time_s + time.time() - started), len(steps),
                         model, optimizer, schedule)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}")
    bar.close()
    model.eval()
    elapsed = done.train_time_s + time.time() - started
    metadata = {
        "kind": "trained", "task": task.name, "base_model": loaded.fingerprint,
        "config": config.model_dump(), "seed": config.seed,
        "init_seed": lora_init_seed(config, task.name), "n_train": len(rows),
        "n_used": len(kept), "n_truncated": sum(len(e.input_ids) == config.max_length for e in kept),
        "train_time_s": round(elapsed, 2), "steps": len(curve),
        "final_loss": curve[-1]["loss"], "device": str(device),
        "resumed_from_step": resumed.step if resumed else None, **(extra_metadata or {}),
    }
    model.peft_config["default"].base_model_name_or_path = loaded.path
    adapters.save_peft_model(model, out_dir, metadata, extra_files={
        "loss_curve.json": lambda path: io.write_json(path, curve),
        "loss_curve.png": lambda path: plot_loss_curve(curve, task.name, path),
    })
    checkpoints.discard()
    return metadata


def optimizer_step(model, optimizer, schedule, micro_batches: list[list[Example]], pad_id: int, device) -> float:
    """One update from its micro-batches; returns the update's mean target-token loss."""
    n_target = sum(sum(label != IGNORE_INDEX for label in e.labels) for batch in micro_batches for e in batch)
    loss_sum = 0.0
    for examples in micro_batches:
        batch = collate(examples, pad_id, device)
        # Divided by the whole update's token count, so that gradient accumulation
        # gives the same step as one large batch.
        loss = batch_loss_sum(model, batch, device) / n_target
        loss.backward()
        loss_sum += loss.item()
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


def run_key(loaded: LoadedModel, task: Task, n_rows: int, kept: list[Example], config: TrainSettings,
            device: torch.device) -> str:
    """Everything that decides this run's steps: only a checkpoint with this key is resumed."""
    return stable_hash({"base": loaded.fingerprint, "task": task.name, "n_train": n_rows,
                        "examples": [[e.input_ids, e.labels] for e in kept],
                        "train": config.result_settings(), "device": device.type})


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
