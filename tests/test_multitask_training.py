"""Multi-task training (one LoRA on the union of the tasks' rows, each encoded by its own task), and
the expert path it generalises, which still writes the same bytes as before multitask existed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from loracombench import adapters
from loracombench.config import TrainSettings
from loracombench.models import load_model
from loracombench.tasks import get_task
from loracombench.training import (IGNORE_INDEX, encode_example, lora_init_seed, train_adapter,
                                   train_multitask_adapter)

AG = [{"text": f"{w} story {i}", "label": y} for i in range(3) for y, w in enumerate(["war", "goal", "stocks", "chip"])]
GSM = [{"question": f"Tom has {a} apples and buys {b} more. How many apples?",
        "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
       for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2)]]
ROWS = {"ag_news": AG, "gsm8k": GSM}
SETTINGS = dict(epochs=2, batch_size=3, grad_accum=2, max_length=64, learning_rate=5e-3, r=4, checkpoint_every=0)

# SHA-256 of the expert adapters that main's code (b061dc2, before multitask training and data
# parallelism) wrote for SETTINGS on tiny-llama, on CPU with torch 2.13.0 and ATen's AVX2 kernels,
# and of the JSON list of their loss curves' losses. The test once hashed the whole
# loss_curve.json, whose lr column then held each step's next rate (fixed 2026-11-29); the code
# that wrote those reference files gives these loss hashes too. A CPU with AVX-512 runs other kernels by default (softmax,
# reductions, the optimizer's), which move the last bits, so training runs in a child process
# pinned to AVX2.
REFERENCE_TORCH = "2.13.0"
REFERENCE_CAPABILITY = "avx2"
REFERENCE = {
    "ag_news": ("94aca9eae6f2671247b613fc39d24b396322707527cf824c4993aae92fde3fda",
                "648279fa9b76b15537032b88b949e256b93a08c17de3f6edef2503bc61e2d3a2"),
    "gsm8k": ("cac43d49d562ffccb1ce83dd3bdc71472deaec68e5aa005a2ee752079a8ca1dd",
              "33cdd8c5ad965dfdc9ddde7aa4f31297a9898af8b7574b2d8eaf6edfaecf118e"),
}
TRAIN_IN_CHILD = """
import json, sys
import torch
from loracombench.config import TrainSettings
from loracombench.models import load_model
from loracombench.tasks import get_task
from loracombench.training import train_adapter
task, rows, settings, out = json.loads(sys.argv[1])
train_adapter(load_model("tiny-llama"), get_task(task), rows, TrainSettings(**settings), out, "cpu", progress=False)
print(torch.backends.cpu.get_cpu_capability())
"""


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def has_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@pytest.mark.skipif(not torch.__version__.startswith(REFERENCE_TORCH),
                    reason=f"the reference bytes were computed with torch {REFERENCE_TORCH}")
@pytest.mark.skipif(not has_avx2(), reason="the reference bytes were computed with ATen's AVX2 kernels")
@pytest.mark.parametrize("task", sorted(REFERENCE))
def test_expert_training_writes_the_bytes_it_wrote_before_multitask_training(tmp_path, task):
    arguments = json.dumps([task, ROWS[task], SETTINGS, str(tmp_path)])
    child = subprocess.run([sys.executable, "-c", TRAIN_IN_CHILD, arguments],
                           env={**os.environ, "ATEN_CPU_CAPABILITY": REFERENCE_CAPABILITY},
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split()[-1] == REFERENCE_CAPABILITY.upper()
    curve = json.loads((tmp_path / "loss_curve.json").read_text())
    losses = hashlib.sha256(json.dumps([step["loss"] for step in curve]).encode()).hexdigest()
    assert (sha256(tmp_path / adapters.WEIGHTS_FILE), losses) == REFERENCE[task]
    # Each step logs the rate it trained at: the full rate first, then linear decay towards zero.
    rate = SETTINGS["learning_rate"]
    assert [step["lr"] for step in curve] == pytest.approx([rate * (1 - k / len(curve)) for k in range(len(curve))])


def target_tokens(tokenizer, task_name: str, rows: list[dict], max_length: int) -> int:
    task = get_task(task_name)
    return sum(sum(label != IGNORE_INDEX for label in encode_example(
        tokenizer, task.prompt(r), task.target(r), max_length, task.target_ends_with_eos).labels) for r in rows)


def test_multitask_loss_is_the_token_weighted_mix_of_each_task_encoded_its_own_way(tmp_path):
    """lora_B starts at zero, so the first step's loss is the base model's mean target-token loss on
    the rows it sees. With all rows in one step, the multi-task run sees the union of both tasks'
    examples, each with its own task's prompt and target: its first loss is the experts' first
    losses weighted by their target-token counts."""
    one_step = TrainSettings(epochs=1, batch_size=len(AG) + len(GSM), max_length=128, checkpoint_every=0)
    loaded = load_model("tiny-llama")
    first_loss, tokens = {}, {}
    for task, rows in ROWS.items():
        train_adapter(load_model("tiny-llama"), get_task(task), rows, one_step, tmp_path / task, "cpu", progress=False)
        first_loss[task] = json.loads((tmp_path / task / "loss_curve.json").read_text())[0]["loss"]
        tokens[task] = target_tokens(loaded.tokenizer, task, rows, 128)
    meta = train_multitask_adapter(loaded, ROWS, one_step, tmp_path / "multitask", "cpu", progress=False)
    mixed = sum(first_loss[t] * tokens[t] for t in ROWS) / sum(tokens.values())
    assert meta["final_loss"] == pytest.approx(mixed, rel=1e-5)
    # and the tolerance separates the mix from either task alone
    assert min(abs(mixed - loss) for loss in first_loss.values()) > 10 * 1e-5 * mixed


def test_multitask_metadata_records_tasks_and_counts_and_ignores_the_order_tasks_are_given(tmp_path):
    config = TrainSettings(**SETTINGS)
    meta = train_multitask_adapter(load_model("tiny-llama"), ROWS, config, tmp_path / "a", "cpu", progress=False)
    train_multitask_adapter(load_model("tiny-llama"), dict(reversed(ROWS.items())), config, tmp_path / "b", "cpu",
                            progress=False)
    assert sha256(tmp_path / "a" / adapters.WEIGHTS_FILE) == sha256(tmp_path / "b" / adapters.WEIGHTS_FILE)
    saved = adapters.read_metadata(tmp_path / "a")
    assert saved["kind"] == "trained" and saved["tasks"] == ["ag_news", "gsm8k"] and "task" not in saved
    assert saved["n_train"] == saved["n_used"] == {"ag_news": len(AG), "gsm8k": len(GSM)}
    assert saved["n_truncated"] == {"ag_news": 0, "gsm8k": 0}
    # 17 rows in micro-batches of 3: 6 micro-batches, 3 steps an epoch
    assert meta["steps"] == 6 and saved["world_size"] == 1
    # its own initialisation, neither expert's
    assert saved["init_seed"] not in {lora_init_seed(config, task) for task in ROWS}


def test_multitask_needs_two_known_tasks():
    config = TrainSettings(**SETTINGS)
    with pytest.raises(ValueError, match=r"at least two tasks, got \['ag_news'\]"):
        train_multitask_adapter(load_model("tiny-llama"), {"ag_news": AG}, config, "unused")
    with pytest.raises(ValueError, match="unknown task 'mnli'; valid tasks: ag_news, gsm8k"):
        train_multitask_adapter(load_model("tiny-llama"), {"ag_news": AG, "mnli": AG}, config, "unused")


def test_multitask_shares_the_experts_settings_whatever_their_memory_settings():
    """How activations are kept does not change an adapter, so a per-task memory setting (README
    "Memory") must not stop multitask training; any setting that changes the adapter does."""
    from loracombench.compose import get_composition
    from loracombench.compose.base import BuildInputs
    from loracombench.config import TrainSettings

    base, multitask = TrainSettings(seed=0, r=4, lora_alpha=8), get_composition("multitask", {"rank_factor": 2})

    def settings(**gsm8k):
        return multitask.settings(BuildInputs(experts={}, seed=0, train_settings={
            "ag_news": base, "gsm8k": base.model_copy(update=gsm8k)}))

    chosen = settings(seed=1, gradient_checkpointing=True, recompute_above_tokens=None, checkpoint_every=3)
    assert (chosen.r, chosen.lora_alpha, chosen.learning_rate) == (8, 16, base.learning_rate)
    # The union's batches hold GSM8K's rows too: the most sparing memory setting of the tasks.
    assert chosen.gradient_checkpointing and chosen.recompute_above_tokens == base.recompute_above_tokens
    assert settings(recompute_above_tokens=256).recompute_above_tokens == 256
    assert settings(recompute_above_tokens=None).recompute_above_tokens == base.recompute_above_tokens
    with pytest.raises(ValueError, match="one set of training settings"):
        settings(learning_rate=base.learning_rate / 2)


def test_the_audited_loss_batches_are_the_batches_trained_on(tmp_path, monkeypatch):
    """Multitask.loss_batches (scripts/lost_targets.py) names the micro-batches of its training,
    tasks in name order whatever order the rows come in."""
    from loracombench import training
    from loracombench.compose import BuildInputs, get_composition

    trained, step = [], training.Trainer.step
    monkeypatch.setattr(training.Trainer, "step", lambda self, micro: trained.extend(micro) or step(self, micro))
    shared, settings = adapters.SharedBase(load_model("tiny-llama")), TrainSettings(**SETTINGS)
    composition = get_composition("multitask", {})
    inputs = BuildInputs(experts={"gsm8k": None, "ag_news": None}, seed=0, borrow_base=shared.borrowed,
                         train_rows={"gsm8k": GSM, "ag_news": AG}, train_settings={"gsm8k": settings, "ag_news": settings},
                         scratch=tmp_path / "scratch")
    (tmp_path / "out").mkdir()
    composition.build(inputs, tmp_path / "out")
    assert trained and trained == composition.loss_batches(inputs, shared.loaded.tokenizer)


def test_an_example_that_fits_max_length_exactly_is_not_counted_as_truncated():
    tokenizer, task = load_model("tiny-llama").tokenizer, get_task("gsm8k")
    row = GSM[0]
    full = encode_example(tokenizer, task.prompt(row), task.target(row), 10_000)
    length = len(full.input_ids)
    assert not full.truncated
    assert not encode_example(tokenizer, task.prompt(row), task.target(row), length).truncated
    cut = encode_example(tokenizer, task.prompt(row), task.target(row), length - 1)
    assert cut.truncated and len(cut.input_ids) == length - 1
