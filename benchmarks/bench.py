"""`make bench`: how fast training, scoring, generation, adapter swaps and merges are, each against
what a user would otherwise run, measured side by side in this one process.

Every figure is a ratio of two timings taken here, one after the other, on the same model, rows
and settings, so that the load of the machine cancels out as far as it can; the issue's targets
are reported next to them (met or not), never asserted. Writes bench.json and bench.md.

    python benchmarks/bench.py [--only training,scoring,...] [--model tiny-llama] [--run-log LOG]

Sections: training (our trainer against transformers' Trainer with PEFT), scoring (AG News
choices read off one forward pass, against a forward pass per choice and against generating the
label), generation (batched GSM8K generation against one prompt at a time), adapters (N adapters
on one loaded base against a base load per adapter), merge (seconds per merge method,
bench_merge.py), memory (peak RSS and time of each task's longest training batches of the
default run, trained with and without recomputed layers and with the loss in chunks, each in a
fresh process) and run (the default run and its fully cached rerun, run here as child processes
or read from the logs of earlier runs with --run-log: stage times, wall time and peak RSS against
the budgets, each stage's model FLOPs on the default preset's rows as a share of the matmul peak,
and the run's FLOPs at that peak against the 20-minute budget). The sections before the run take
about 18 minutes on 2 idle cores, half of that the memory section; the default run itself 14-27.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace
from typing import Callable
from unittest import mock

import torch
import yaml

import bench_merge
from loracombench import adapters, evaluation, io
from loracombench.cli import HelpFormatter, seed_type
from loracombench.config import PRESETS_DIR, EvalSettings, TrainSettings, load_config
from loracombench.data import load_sample
from loracombench.evaluation import EvalConfig
from loracombench.models import DEFAULT_MODEL, environment, load_model
from loracombench.pipeline import Experiment
from loracombench.tasks import get_task
from loracombench.training import IGNORE_INDEX, lora_config, train_adapter, training_examples

DEFAULT_OUT = Path(__file__).parent / "results"
TRAIN_TASKS = ("ag_news", "gsm8k")
MINUTE = 60.0
GB = 1024**3


# ---------------------------------------------------------------- figures and targets

@dataclass(frozen=True)
class Target:
    """A bound the issue sets on a ratio: at least `bound` (a speed-up) or at most (a budget)."""

    bound: float
    at_least: bool = True

    def met(self, value: float) -> bool:
        return value >= self.bound if self.at_least else value <= self.bound

    def __str__(self) -> str:
        return f"{'≥' if self.at_least else '≤'} {self.bound:g}"


def ratio(figure: str, value: float, target: Target | None = None) -> dict:
    # Four significant digits: a share of the peak on the tiny test model is 1e-4 or less.
    return {"figure": figure, "value": float(f"{value:.4g}"), "target": str(target) if target else None,
            "met": target.met(value) if target else None}


def timed(work: Callable):
    """(what work returns, its wall seconds)."""
    started = time.perf_counter()
    result = work()
    return result, time.perf_counter() - started


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def argmaxes(scores: list[list[float]]) -> list[int]:
    return [evaluation.argmax(row) for row in scores]


class Context:
    """What the sections share: the arguments and one loaded base, loaded when first needed."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    @cached_property
    def shared(self) -> adapters.SharedBase:
        shared = adapters.SharedBase(load_model(self.args.model))
        warm_up(shared.loaded)
        return shared

    @cached_property
    def preset(self) -> dict:
        """configs/default.yaml, the run the bench's settings and samples follow."""
        return yaml.safe_load((PRESETS_DIR / "default.yaml").read_text(encoding="utf-8"))

    def train_settings(self) -> TrainSettings:
        """The default run's LoRA and optimiser settings, at the bench's batch size, one epoch, never checkpointed."""
        return TrainSettings(**{**self.preset["train"], "epochs": 1, "batch_size": self.args.train_batch_size,
                                "checkpoint_every": 0})

    @property
    def score_batch_size(self) -> int:
        """--score-batch-size, else the rows per scoring pass of the default run."""
        return self.args.score_batch_size or EvalSettings(**self.preset.get("eval", {})).batch_size

    def sample(self, task: str, split: str, n: int) -> list[dict]:
        return load_sample(task, split, n, self.args.seed, self.args.data_dir)


@torch.inference_mode()
def warm_up(loaded) -> None:
    """One forward pass first, so that no timed side pays the first call's allocations alone."""
    ids = torch.tensor([evaluation.encode(loaded.tokenizer, "warm up " * 32)])
    loaded.model(input_ids=ids)


# ---------------------------------------------------------------- 1. training

def matmul_peak_flops(size: int, repeats: int = 5) -> float:
    """The best FLOP/s of an fp32 square matmul on this machine: what training is a fraction of."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.matmul(a, b, out=out)
    best = min(timed(lambda: torch.matmul(a, b, out=out))[1] for _ in range(repeats))
    return 2 * size**3 / best


def non_embedding_parameters(model: torch.nn.Module) -> int:
    """N of the 4·N FLOPs per token: every parameter but the input embedding (a lookup, not a
    matmul). A tied output projection shares the embedding's tensor, so it is not counted either."""
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not embedding)


def hf_trainer_seconds(loaded, examples, settings: TrainSettings, scratch: str) -> float:
    """One epoch of transformers' Trainer over a PEFT model with its defaults (full logits,
    right padding, random order), on our encoded examples; its own train_runtime, which like our
    train_time_s leaves out tokenising and wrapping the model but counts its optimizer's set-up."""
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainingArguments

    torch.manual_seed(settings.seed)
    model = get_peft_model(loaded.model, lora_config(settings, loaded.model.config.model_type))
    arguments = TrainingArguments(output_dir=scratch, per_device_train_batch_size=settings.batch_size,
                                  num_train_epochs=1, learning_rate=settings.learning_rate, seed=settings.seed,
                                  report_to="none", save_strategy="no", disable_tqdm=True)
    dataset = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
               for e in examples]
    collator = DataCollatorForSeq2Seq(loaded.tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset, data_collator=collator)
    trainer.remove_callback(PrinterCallback)  # it would print the final metrics into the bench's output
    return trainer.train().metrics["train_runtime"]


def train_one_task(ctx: Context, task_name: str, settings: TrainSettings) -> dict:
    task = get_task(task_name)
    rows = ctx.sample(task_name, "train", ctx.args.train_rows)
    _, examples = training_examples(ctx.shared.loaded.tokenizer, [(task, rows)], settings.max_length)
    with tempfile.TemporaryDirectory() as scratch, ctx.shared.borrowed() as loaded:
        ours = train_adapter(loaded, task, rows, settings, Path(scratch) / "adapter", progress=False)["train_time_s"]
    with tempfile.TemporaryDirectory() as scratch, ctx.shared.borrowed() as loaded:
        hf = hf_trainer_seconds(loaded, examples, settings, scratch)
    return {"examples": len(examples), "steps": -(-len(examples) // settings.batch_size),
            # Useful: the target tokens the loss is taken on; processed: every non-pad token,
            # each of which goes forward and backward through the model.
            "useful_tokens": sum(label != IGNORE_INDEX for e in examples for label in e.labels),
            "processed_tokens": sum(len(e.input_ids) for e in examples),
            "seconds": {"ours": ours, "hf_trainer_peft": hf}}


def warm_up_training(ctx: Context, settings: TrainSettings) -> None:
    """One untimed optimizer step first: the process's first backward pass pays one-time costs
    (fresh activation memory, kernel set-up) that would otherwise land on whichever trainer runs
    first."""
    rows = ctx.sample(TRAIN_TASKS[0], "train", settings.batch_size)
    with tempfile.TemporaryDirectory() as scratch, ctx.shared.borrowed() as loaded:
        train_adapter(loaded, get_task(TRAIN_TASKS[0]), rows, settings, Path(scratch) / "adapter", progress=False)


def training_section(ctx: Context) -> dict:
    settings = ctx.train_settings()
    peak = matmul_peak_flops(ctx.args.matmul_size)
    warm_up_training(ctx, settings)
    per_task = {task: train_one_task(ctx, task, settings) for task in TRAIN_TASKS}
    parameters = non_embedding_parameters(ctx.shared.loaded.model)
    totals = {key: sum(t[key] for t in per_task.values()) for key in ("useful_tokens", "processed_tokens")}
    seconds = {who: sum(t["seconds"][who] for t in per_task.values()) for who in ("ours", "hf_trainer_peft")}
    flops = 4 * parameters * totals["processed_tokens"]
    ratios = [ratio("useful tokens/s: ours ÷ HF Trainer + PEFT defaults, all tasks",
                    seconds["hf_trainer_peft"] / seconds["ours"], Target(1.5))]
    ratios += [ratio(f"useful tokens/s: ours ÷ HF Trainer + PEFT defaults, {task}",
                     t["seconds"]["hf_trainer_peft"] / t["seconds"]["ours"]) for task, t in per_task.items()]
    ratios += [ratio("model FLOP/s ÷ fp32 matmul peak, ours", flops / seconds["ours"] / peak, Target(0.5)),
               ratio("model FLOP/s ÷ fp32 matmul peak, HF Trainer + PEFT", flops / seconds["hf_trainer_peft"] / peak)]
    return {"ratios": ratios, "measured": {
        "per_task": per_task, **totals, "seconds": seconds,
        "useful_tokens_per_s": {who: totals["useful_tokens"] / s for who, s in seconds.items()},
        "non_embedding_parameters": parameters, "flops_per_processed_token": 4 * parameters,
        "model_gflops_per_s": {who: flops / s / 1e9 for who, s in seconds.items()},
        "matmul_peak_gflops_per_s": peak / 1e9, "matmul_size": ctx.args.matmul_size,
        "settings": {k: getattr(settings, k) for k in ("r", "lora_alpha", "lora_dropout", "learning_rate",
                                                         "batch_size", "max_length", "epochs")}}}


# ---------------------------------------------------------------- 2. AG News scoring

@torch.inference_mode()
def score_like_lm_eval(model, tokenizer, task, rows: list[dict], reuse_logits: bool = True) -> list[list[float]]:
    """lm-eval-harness's HF multiple-choice scoring at its default batch size 1: each (article,
    choice) request reads the log-softmax of (context + continuation)[:-1] at the continuation's
    positions. With reuse_logits (its default, logits_cache=True) requests with the same
    context + continuation[:-1] share one forward pass (_lookup_one_token_cont in
    lm_eval/models/huggingface.py), so one-token choices, as AG News's are here, cost one pass per
    article; without it, every choice takes its own pass."""
    device = evaluation.model_device(model)
    scores = []
    for row in rows:
        context, passes, row_scores = evaluation.encode(tokenizer, task.prompt(row)), {}, []
        for choice in task.choices(row):
            continuation = evaluation.encode(tokenizer, task.choice_delimiter + choice)
            inputs = tuple((context + continuation)[:-1])
            if inputs not in passes or not reuse_logits:
                logits = model(input_ids=torch.tensor([inputs], device=device)).logits[0].float()
                passes[inputs] = torch.log_softmax(logits, dim=-1)
            logprobs = passes[inputs][-len(continuation):]
            row_scores.append(logprobs.gather(1, torch.tensor(continuation, device=device)[:, None]).sum().item())
        scores.append(row_scores)
    return scores


def tokens_read(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> int:
    """The tokens one forward pass reads, padding left out; a pass continued from a cached prefix
    reads only its new tokens, the last columns of its attention mask."""
    return int(input_ids.numel() if attention_mask is None else attention_mask[:, -input_ids.shape[1]:].sum())


@contextmanager
def counted_tokens(model):
    """Counts the tokens the model's forward passes read (tokens_read): a list whose sum is the count."""
    counts: list[int] = []

    def count(module, args, kwargs):
        counts.append(tokens_read(kwargs.get("input_ids", args[0] if args else None), kwargs.get("attention_mask")))

    hook = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield counts
    finally:
        hook.remove()


def scoring_section(ctx: Context) -> dict:
    args, task = ctx.args, get_task("ag_news")
    rows = ctx.sample("ag_news", "test", args.score_rows)
    tokenizer = ctx.shared.loaded.tokenizer
    batch_size = ctx.score_batch_size
    label_config = EvalConfig(max_new_tokens=args.label_tokens, generate_batch_size=batch_size)
    with ctx.shared.with_adapter(None) as model:
        # This host's speed drifts by tens of percent within minutes, so the peak is measured
        # just before and just after the timed scoring, and the better of the two kept.
        peak_before = matmul_peak_flops(args.matmul_size)
        with counted_tokens(model) as counts:
            ours, ours_s = timed(lambda: evaluation.score_choices(model, tokenizer, task, rows,
                                                                  batch_size, progress=False))
        peak = max(peak_before, matmul_peak_flops(args.matmul_size))
        with counted_tokens(model) as lm_eval_counts:
            lm_eval, lm_eval_s = timed(lambda: score_like_lm_eval(model, tokenizer, task, rows))
        each, each_s = timed(lambda: score_like_lm_eval(model, tokenizer, task, rows, reuse_logits=False))
        _, generate_s = timed(lambda: evaluation.generate(model, tokenizer, [task.prompt(r) for r in rows],
                                                          label_config, ("\n",), progress=False))
    difference = max(max_abs_diff(ours, lm_eval), max_abs_diff(ours, each))
    same = sum(a == b == c for a, b, c in zip(argmaxes(ours), argmaxes(lm_eval), argmaxes(each)))
    # A forward pass costs 2·N per token read (the vocabulary projection, on a few positions
    # only, is left out, as the training figure leaves it out).
    flops = 2 * non_embedding_parameters(model) * sum(counts)
    # lm-eval projects every position onto the vocabulary: 2·V·d more per token read.
    lm_eval_flops = (2 * non_embedding_parameters(model) + 2 * model.get_output_embeddings().weight.numel()) \
        * sum(lm_eval_counts)
    # The issue set its 3x target against "a forward pass per choice (lm-eval's default)", but
    # lm-eval's default shares one pass among one-token choices: the target is held to that.
    return {"ratios": [ratio("articles/s: score_choices ÷ lm-eval's scoring (its default, logits_cache)",
                             lm_eval_s / ours_s, Target(3)),
                       ratio("articles/s: score_choices ÷ a forward pass per choice (lm-eval, logits_cache off)",
                             each_s / ours_s),
                       ratio("articles/s: score_choices ÷ generating the label (batched greedy)",
                             generate_s / ours_s),
                       ratio("model FLOP/s ÷ fp32 matmul peak, score_choices", flops / ours_s / peak),
                       ratio("model FLOP/s ÷ fp32 matmul peak, lm-eval's scoring", lm_eval_flops / lm_eval_s / peak),
                       # What the first ratio would be if score_choices ran its FLOPs at the full
                       # peak (attention left out, so a bound): a target above it asks for less work.
                       ratio("ceiling of the first ratio: lm-eval's seconds ÷ score_choices' FLOPs at the matmul peak",
                             lm_eval_s / (flops / peak))],
            "agreement": {"max_abs_logprob_diff": difference, "same_prediction": same, "rows": len(rows),
                          "holds": difference < ctx.args.tolerance and same == len(rows)},
            "measured": {"articles": len(rows), "choices": len(task.choices(rows[0])),
                         "seconds": {"score_choices": ours_s, "lm_eval": lm_eval_s, "per_choice": each_s,
                                     "generate_label": generate_s},
                         "tokens_read": sum(counts), "forward_passes": len(counts),
                         "lm_eval_tokens_read": sum(lm_eval_counts), "lm_eval_forward_passes": len(lm_eval_counts),
                         "model_gflops_per_s": flops / ours_s / 1e9, "matmul_peak_gflops_per_s": peak / 1e9,
                         "batch_size": batch_size, "label_tokens": args.label_tokens}}


# ---------------------------------------------------------------- 3. GSM8K generation

@torch.inference_mode()
def generate_one_by_one(model, tokenizer, prompts: list[str], max_new_tokens: int, stops) -> list[str]:
    """What a user writes without batching: model.generate on each prompt alone, greedy, KV-cached."""
    device = evaluation.model_device(model)
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([evaluation.encode(tokenizer, prompt)], device=device)
        tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=max_new_tokens, stop_strings=list(stops), tokenizer=tokenizer,
                                use_cache=True, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True)
        outputs.append(evaluation.cut_at_stop(text, stops))
    return outputs


def generation_section(ctx: Context) -> dict:
    args, task = ctx.args, get_task("gsm8k")
    prompts = [task.prompt(r) for r in ctx.sample("gsm8k", "test", args.generate_rows)]
    tokenizer = ctx.shared.loaded.tokenizer
    config = EvalConfig(max_new_tokens=args.max_new_tokens, generate_batch_size=args.generate_batch_size)
    with ctx.shared.with_adapter(None) as model:
        batched, batched_s = timed(lambda: evaluation.generate(model, tokenizer, prompts, config, task.stop_strings,
                                                               progress=False))
        single, single_s = timed(lambda: generate_one_by_one(model, tokenizer, prompts, args.max_new_tokens,
                                                             task.stop_strings))
    identical = sum(a == b for a, b in zip(batched, single))
    return {"ratios": [ratio("prompts/s: batched evaluation.generate ÷ one-by-one model.generate",
                             single_s / batched_s, Target(4))],
            "agreement": {"identical_outputs": identical, "prompts": len(prompts), "holds": identical == len(prompts)},
            "measured": {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                         "batch_size": args.generate_batch_size,
                         "generated_tokens": sum(len(evaluation.encode(tokenizer, o)) for o in batched),
                         "seconds": {"batched": batched_s, "one_by_one": single_s}}}


# ---------------------------------------------------------------- 4. N adapters, one base load

def write_random_adapters(shared: adapters.SharedBase, settings: TrainSettings, count: int, std: float,
                          folder: Path) -> list[Path]:
    """`count` seeded LoRA adapters of the trainer's shape, lora_B drawn at random (a fresh LoRA
    has lora_B = 0, which would make every adapter the base)."""
    from peft import get_peft_model

    paths = []
    for index in range(count):
        with shared.borrowed() as loaded:
            torch.manual_seed(index)
            model = get_peft_model(loaded.model, lora_config(settings, loaded.model.config.model_type))
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if "lora_B" in name:
                        parameter.normal_(std=std)
            model.peft_config["default"].base_model_name_or_path = loaded.path
            paths.append(adapters.save_peft_model(model, folder / f"random-{index}",
                                                  {"kind": "bench-random", "base_model": loaded.fingerprint}))
    return paths


def adapters_section(ctx: Context) -> dict:
    args, task = ctx.args, get_task("ag_news")
    rows = ctx.sample("ag_news", "test", args.adapter_rows)

    def score(model, tokenizer) -> list[list[float]]:
        return evaluation.score_choices(model, tokenizer, task, rows, ctx.score_batch_size, progress=False)

    def one_load() -> list:
        shared = adapters.SharedBase(load_model(args.model))
        scores = []
        for path in paths:
            with shared.with_adapter(path) as model:
                scores.append(score(model, shared.loaded.tokenizer))
        return scores

    def load_per_adapter() -> list:
        scores = []
        for path in paths:
            loaded = load_model(args.model)
            scores.append(score(adapters.apply_adapter(loaded, path), loaded.tokenizer))
        return scores

    with tempfile.TemporaryDirectory() as scratch:
        paths = write_random_adapters(ctx.shared, ctx.train_settings(), args.adapters, args.adapter_std, Path(scratch))
        gc.collect()
        shared_scores, shared_s = timed(one_load)
        gc.collect()
        reloaded_scores, reloaded_s = timed(load_per_adapter)
    difference = max(max_abs_diff(a, b) for a, b in zip(shared_scores, reloaded_scores))
    same = sum(argmaxes(a) == argmaxes(b) for a, b in zip(shared_scores, reloaded_scores))
    return {"ratios": [ratio(f"{args.adapters} adapters evaluated: one base load (folded in) ÷ a base load per adapter",
                             reloaded_s / shared_s)],
            "agreement": {"max_abs_logprob_diff": difference, "adapters_with_same_predictions": same,
                          "adapters": len(paths), "holds": same == len(paths) and difference < ctx.args.tolerance},
            "measured": {"adapters": len(paths), "articles": len(rows), "lora_B_std": args.adapter_std,
                         "seconds": {"one_base_load": shared_s, "base_load_per_adapter": reloaded_s}}}


# ---------------------------------------------------------------- 5. merge time per method

def merge_section(ctx: Context) -> dict:
    timing = bench_merge.merge_timing(ctx.args.merge_repeats, ctx.args.merge_threads, ctx.args.merge_layers)
    seconds, reference = timing["seconds"], timing["seconds"]["average"]
    return {"ratios": [ratio(f"{label} ÷ average (merge seconds)", value / reference)
                       for label, value in seconds.items() if label != "average"],
            "measured": timing}


# ---------------------------------------------------------------- 6. the default run

STAGES_LINE = re.compile(r"stages: (?P<stages>[^;\n]*); total (?P<total>\d+(?:\.\d+)?) s")
STAGE = re.compile(r"(?P<name>[\w-]+) (?P<seconds>\d+(?:\.\d+)?) s")
TIME_MAX_RSS = re.compile(r"Maximum resident set size \(kbytes\): (?P<kb>\d+)")  # GNU time -v
TIME_ELAPSED = re.compile(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?P<clock>[\d:.]+)")


def clock_seconds(clock: str) -> float:
    """GNU time's h:mm:ss or m:ss."""
    seconds = 0.0
    for part in clock.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


class BenchError(ValueError):
    """A bench input that cannot be used; the message is one line."""


# The cells a run computed (a cached cell prints no "done"): experts' training and models' evaluation.
COMPUTED = {"train": re.compile(r"\] train (?P<task>\S+) \(seed \d+\): done in ", re.M),
            "evaluate": re.compile(r"\] eval \S+ on (?P<task>\S+): done in ", re.M)}


def read_run_log(path: Path) -> dict:
    """Stage seconds and total of the last `stages: ...; total T s` line `loracombench run` printed,
    the cells per task that run computed (its lines after the stages line before it), and the
    peak RSS that GNU `time -v` reported, if the log has it."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise BenchError(f"{path}: cannot read the run log ({err.strerror})") from None
    lines = list(STAGES_LINE.finditer(text))
    if not lines:
        raise BenchError(f"{path}: no '[hh:mm:ss] stages: train X s, ...; total T s' line, which "
                         f"`loracombench run` prints when it finishes (pass the log of a finished run)")
    last = lines[-1]
    this_run = text[lines[-2].end() if len(lines) > 1 else 0: last.start()]
    computed = {stage: {} for stage in COMPUTED}
    for stage, pattern in COMPUTED.items():
        for match in pattern.finditer(this_run):
            computed[stage][match["task"]] = computed[stage].get(match["task"], 0) + 1
    rss, elapsed = TIME_MAX_RSS.findall(text), TIME_ELAPSED.findall(text)
    return {"stages": {m["name"]: float(m["seconds"]) for m in STAGE.finditer(last["stages"])},
            "total_s": float(last["total"]), "computed_cells": computed,
            "peak_rss_gb": int(rss[-1]) * 1024 / GB if rss else None,
            # The process's whole wall time: the run's own total starts after loading the data and
            # the model and ends before the report is printed, and is rounded to the second.
            "wall_s": clock_seconds(elapsed[-1]) if elapsed else None}


def run_seconds(run: dict) -> tuple[float, str]:
    """The time a budget is held to: the process's wall time where it is known."""
    if run["wall_s"] is not None:
        return run["wall_s"], "wall time"
    return run["total_s"], "the run's own total, without start-up"


class _PrefixCache:
    def batch_repeat_interleave(self, repeats: int) -> None:
        pass


class TokenCounter(torch.nn.Module):
    """Stands in for the model in the run's own scoring functions: counts the tokens each forward
    pass reads (tokens_read) and returns zero logits. The batching, padding and prefix sharing are
    then exactly the run's, at none of its cost."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # where the scorers find the device
        self.vocab_size = vocab_size
        self.counts: list[int] = []

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, **_):
        self.counts.append(tokens_read(input_ids, attention_mask))
        rows, width = input_ids.shape
        return SimpleNamespace(logits=torch.zeros(rows, logits_to_keep or width, self.vocab_size),
                               cache=_PrefixCache())


def evaluation_tokens(loaded, task, rows: list[dict], config: EvalConfig) -> int:
    """The tokens one model's evaluation on `rows` reads, counted through the run's scorer."""
    counter = TokenCounter(loaded.model.config.vocab_size)
    predict, _ = evaluation.SCORERS[task.kind]
    predict(counter, loaded.tokenizer, task, rows, range(len(rows)), config, False)
    return sum(counter.counts)


def default_preset_for(data_dir: str | None, computed: dict[str, dict[str, int]]):
    """The default preset, checked against the cells a run log shows computed."""
    config = load_config("default", {"data_dir": data_dir} if data_dir else {})
    unknown = sorted({task for cells in computed.values() for task in cells} - set(config.tasks))
    if unknown:
        raise BenchError(f"--run-log: the run computed cells of {', '.join(unknown)}, which the default "
                         f"preset does not have (pass the log of `loracombench run` on the default preset)")
    if config.eval.n_generate != 0:
        raise BenchError("the default preset generates (eval.n_generate), which the FLOP count leaves out")
    return config


def default_run_flops(ctx: Context, computed: dict[str, dict[str, int]]) -> dict:
    """The model FLOPs of the cells a default run computed, counted as the sections above count
    them (4·N per token trained on, 2·N per token read in evaluation), on the default preset's
    own rows. Padding, attention, the vocabulary projection, recomputed layers and every other
    cell are left out, so at the matmul peak this is a floor under the run's time."""
    config = default_preset_for(ctx.args.data_dir, computed)
    experiment, loaded = Experiment(config, tempfile.gettempdir()), ctx.shared.loaded
    parameters = non_embedding_parameters(loaded.model)
    tokens = {"train": {}, "evaluate": {}}
    for name in config.tasks:
        task, settings = get_task(name), config.train_settings(name, config.seeds[0])
        _, kept = training_examples(loaded.tokenizer, [(task, experiment.train_rows(name))], settings.max_length)
        tokens["train"][name] = settings.epochs * sum(len(e.input_ids) for e in kept)
        tokens["evaluate"][name] = evaluation_tokens(loaded, task, experiment.eval_rows(name),
                                                     experiment.eval_config(name))
    per_token = {"train": 4 * parameters, "evaluate": 2 * parameters}
    flops = {stage: per_token[stage] * sum(cells * tokens[stage][task] for task, cells in computed[stage].items())
             for stage in per_token}
    return {"tokens_per_cell": tokens, "computed_cells": computed, "flops_per_token": per_token, "flops": flops}


def run_floor_ratios(ctx: Context, run: dict) -> tuple[list[dict], dict]:
    """Each stage's model FLOP/s as a share of the matmul peak, and the run's FLOPs at that peak
    against the 20-minute budget: what share of the peak a run must hold to finish in time.
    The peak is measured now, the run was timed before: both are this host, at other moments."""
    counted = default_run_flops(ctx, run["computed_cells"])
    peak = matmul_peak_flops(ctx.args.matmul_size)
    ratios = [ratio(f"{stage} stage: model FLOP/s ÷ fp32 matmul peak (default preset's rows)",
                    counted["flops"][stage] / run["stages"][stage] / peak)
              for stage in counted["flops"] if counted["flops"][stage] and run["stages"].get(stage)]
    floor_s = sum(counted["flops"].values()) / peak
    if floor_s:
        ratios.append(ratio("run's model FLOPs at the matmul peak ÷ 20 minutes (the share of the peak a "
                            "20-minute run must hold)", floor_s / (20 * MINUTE)))
    return ratios, {**counted, "matmul_peak_gflops_per_s": peak / 1e9, "floor_s": floor_s}


RUN_CONFIG = "default"  # the run the budgets are for (a test points it at a tiny config)


# `loracombench <argv>`, then its own peak RSS as GNU time -v words it. VmHWM is the high-water
# mark of this process's memory since its exec; the maxrss that wait4 reports for a child also
# counts the memory it was started from (the bench's, often GBs above the run's).
RUN_REPORTING_ITS_PEAK = """import sys
from loracombench.cli import main
try:
    code = main(sys.argv[1:])
finally:
    peak = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(f"\\tMaximum resident set size (kbytes): {peak}", flush=True)
sys.exit(code)
"""


def timed_run(argv: list[str], log: Path, kept: Path) -> dict:
    """`loracombench <argv>` in a child process, its output written to `log` and, once it ended,
    copied to `kept`: read_run_log's figures, with the child's wall time and its own peak RSS."""
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        returncode = subprocess.run([sys.executable, "-c", RUN_REPORTING_ITS_PEAK, *argv], stdout=out,
                                    stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    io.write_text(kept, log.read_text(encoding="utf-8"))
    if returncode != 0:
        raise BenchError(f"`loracombench {' '.join(argv)}` exited with {returncode}; its output: {kept}")
    return {**read_run_log(kept), "wall_s": wall}


def measure_default_run(ctx: Context) -> tuple[dict, dict]:
    """The default run into a fresh folder, then the same command again with every cell cached;
    their logs are kept beside bench.json (run.log, cached-run.log)."""
    argv = ["run", "--config", RUN_CONFIG, "--model", ctx.args.model]
    if ctx.args.data_dir:
        argv += ["--data-dir", str(ctx.args.data_dir)]
    with tempfile.TemporaryDirectory(prefix="bench-run-") as scratch:
        argv += ["--out", str(Path(scratch) / "run")]
        return tuple(timed_run(argv, Path(scratch) / f"{name}.log", ctx.args.out_dir / f"{name}.log")
                     for name in ("run", "cached-run"))


def run_section(ctx: Context) -> dict:
    """The default run's stage times, its wall time and peak RSS and a fully cached rerun's: run
    here as child processes, or read from the logs of runs made before (--run-log)."""
    bench_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # Linux reports kB
    ratios, measured = [], {"bench_peak_rss_gb": bench_rss}
    run = rerun = None
    if ctx.args.run_log:
        run = read_run_log(ctx.args.run_log)
        rerun = read_run_log(ctx.args.cached_run_log) if ctx.args.cached_run_log else None
        measured["source"] = "logs of earlier runs (--run-log)"
    elif not ctx.args.no_run:
        print(f"[{time.strftime('%H:%M:%S')}] run: the default run, then its cached rerun (child processes) ...",
              file=sys.stderr, flush=True)
        run, rerun = measure_default_run(ctx)
        measured["source"] = "run by this bench (run.log, cached-run.log beside bench.json)"
    if run:
        measured["run"] = run
        ratios += [ratio(f"{stage} ÷ total (share of the run's time)", seconds / run["total_s"])
                   for stage, seconds in run["stages"].items()]
        seconds, clock = run_seconds(run)
        ratios.append(ratio(f"run time ÷ 20 minutes ({clock})", seconds / (20 * MINUTE), Target(1, at_least=False)))
        floor_ratios, measured["model_flops"] = run_floor_ratios(ctx, run)
        ratios += floor_ratios
        if run["peak_rss_gb"] is not None:
            ratios.append(ratio("run peak RSS ÷ 4 GB", run["peak_rss_gb"] / 4, Target(1, at_least=False)))
    if rerun:
        measured["cached_rerun"] = rerun
        seconds, clock = run_seconds(rerun)
        ratios.append(ratio(f"fully cached rerun time ÷ 1 minute ({clock})", seconds / MINUTE,
                            Target(1, at_least=False)))
    # No target: the 4 GB is the run's budget, and this process holds every section's models.
    ratios.append(ratio("this bench process's own peak RSS ÷ 4 GB (not the run's)", bench_rss / 4))
    if not run:
        measured["note"] = "--no-run: the default run was not measured (no stage times, run time or run peak RSS)"
    return {"ratios": ratios, "measured": measured}


# ---------------------------------------------------------------- 7. memory

def train_in_fresh_process(model: str, task_name: str, rows: list[dict], settings: TrainSettings) -> dict:
    """Runs in a spawned process, so that its peak RSS is this training run's alone."""
    loaded = load_model(model)
    with tempfile.TemporaryDirectory() as scratch:
        seconds = train_adapter(loaded, get_task(task_name), rows, settings, Path(scratch),
                                progress=False)["train_time_s"]
        weights = (Path(scratch) / adapters.WEIGHTS_FILE).read_bytes()
        tensors = adapters.read_weights(Path(scratch))
    return {"train_time_s": seconds, "peak_rss_gb": own_peak_rss_gb(),
            "weights_sha256": hashlib.sha256(weights).hexdigest(), "weights": tensors,
            "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_")}


def relative_difference(weights: dict, reference: dict) -> float:
    """The largest ‖a − b‖ / ‖b‖ over the adapter's tensors."""
    return max(float((weights[k] - reference[k]).norm() / reference[k].norm()) for k in reference)


def own_peak_rss_gb() -> float:
    """This process's peak RSS. Linux's ru_maxrss survives exec, so a process spawned by a large
    parent would report the parent's peak; VmHWM belongs to the address space exec made."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)[1]) * 1024 / GB


def longest_training_rows(ctx: Context, task_name: str) -> list[dict]:
    """The rows with the most tokens among the default run's training sample of the task."""
    task, tokenizer = get_task(task_name), ctx.shared.loaded.tokenizer
    return sorted(ctx.sample(task_name, "train", ctx.preset["n_train"][task_name]), key=lambda r: -len(
        evaluation.encode(tokenizer, task.prompt(r) + task.target(r))))[: ctx.args.memory_rows]


# name -> (training settings, environment of the training process)
MEMORY_VARIANTS = {
    "every activation kept": ({"gradient_checkpointing": False, "recompute_above_tokens": None}, {}),
    "recompute above the default's tokens": ({"gradient_checkpointing": False}, {}),
    "every layer recomputed": ({"gradient_checkpointing": True}, {}),
    # glibc otherwise raises its mmap threshold as large blocks are freed, after which freed
    # activations stay in its heap as fragments; fixed at 1 MB, each is unmapped when freed, and
    # mapped and zero-filled again when the next is allocated (README: "Memory").
    "recompute above the default's tokens, MALLOC_MMAP_THRESHOLD_=1048576": (
        {"gradient_checkpointing": False}, {"MALLOC_MMAP_THRESHOLD_": "1048576"}),
    # The only variant that may change the adapter (float rounding): compared, not required equal.
    "recompute above the default's tokens, loss in chunks of 256 targets": (
        {"gradient_checkpointing": False, "loss_chunk_tokens": 256}, {}),
}


def memory_section(ctx: Context) -> dict:
    """Each task's longest training batches of the default run, trained keeping every activation,
    with the default's recompute_above_tokens (also with glibc's mmap threshold fixed, and with the
    loss in chunks) and with every layer recomputed, each in a fresh process: the peak RSS of a
    run is its training's."""
    import multiprocessing

    spawn, settings = multiprocessing.get_context("spawn"), ctx.train_settings()
    ratios, measured, identical, chunked = [], {}, {}, {}
    for task_name in TRAIN_TASKS:
        rows = longest_training_rows(ctx, task_name)
        runs = {}
        for variant, (update, variables) in MEMORY_VARIANTS.items():
            # glibc reads its malloc settings once, when the process starts
            with mock.patch.dict(os.environ, variables), spawn.Pool(1) as pool:
                runs[variant] = pool.apply(train_in_fresh_process, (
                    ctx.args.model, task_name, rows, settings.model_copy(update=update)))
        kept = runs["every activation kept"]
        exact = [run for variant, run in runs.items() if "loss_chunk_tokens" not in MEMORY_VARIANTS[variant][0]]
        identical[task_name] = len({run["weights_sha256"] for run in exact}) == 1
        chunked[task_name] = max((relative_difference(run["weights"], kept["weights"]) for variant, run in runs.items()
                                  if "loss_chunk_tokens" in MEMORY_VARIANTS[variant][0]), default=0.0)
        for run in runs.values():
            del run["weights"]
        for variant in list(MEMORY_VARIANTS)[1:]:
            ratios += [ratio(f"peak RSS: {variant} ÷ every activation kept, {task_name}",
                             runs[variant]["peak_rss_gb"] / kept["peak_rss_gb"]),
                       ratio(f"training seconds: {variant} ÷ every activation kept, {task_name}",
                             runs[variant]["train_time_s"] / kept["train_time_s"])]
        measured[task_name] = {"rows": len(rows), **runs}
    return {"ratios": ratios,
            # Every exact variant's adapter is the same; the chunked loss's may move by float rounding.
            "agreement": {"identical_adapter_weights": sum(identical.values()), "tasks": len(identical),
                          "chunked_loss_relative_weight_difference": max(chunked.values()),
                          "holds": all(identical.values())},
            "measured": {**measured, "batch_size": settings.batch_size, "max_length": settings.max_length,
                         "recompute_above_tokens": settings.recompute_above_tokens}}


# ---------------------------------------------------------------- sections, output, command line

SECTIONS: dict[str, Callable[[Context], dict]] = {
    "training": training_section,
    "scoring": scoring_section,
    "generation": generation_section,
    "adapters": adapters_section,
    "merge": merge_section,
    "memory": memory_section,
    "run": run_section,  # last: its peak RSS covers the sections before it
}


def select_sections(only: str | None) -> list[str]:
    """The sections `--only` names, in SECTIONS order; all of them when it is not given."""
    if only is None:
        return list(SECTIONS)
    names = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise BenchError(f"--only: unknown section(s) {', '.join(unknown) or repr(only)}; valid: {', '.join(SECTIONS)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise BenchError(f"--only: section(s) named twice: {', '.join(repeated)}; valid: {', '.join(SECTIONS)}")
    return [name for name in SECTIONS if name in names]


def setup(args: argparse.Namespace) -> dict:
    """The machine and code the figures hold for; ATen's CPU capability (AVX2, AVX512) among them."""
    return {"model": args.model, "started": time.strftime("%Y-%m-%d %H:%M:%S"), **environment(torch.device("cpu")),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "load_average_at_start": os.getloadavg(), "seed": args.seed,
            "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}


def markdown(result: dict) -> str:
    s = result["setup"]
    load = ", ".join(f"{x:.1f}" for x in s["load_average_at_start"])
    lines = [f"# make bench: {s['model']}, {s['started']}", "",
             f"torch {s['torch']}, transformers {s['transformers']}, peft {s['peft']}; {s['torch_threads']} torch "
             f"threads, {s['cpu_count']} CPUs ({s.get('cpu_capability', 'unrecorded')} kernels), load average at "
             f"start {load}. Every figure is a ratio of two timings taken side by side in this process (higher is "
             "faster for ours, except budgets); targets are the issue's.", ""]
    for name, section in result["sections"].items():
        lines += [f"## {name}", "", "| figure | ratio | target | met |", "| --- | ---: | --- | --- |"]
        for r in section["ratios"]:
            met = "" if r["met"] is None else ("met" if r["met"] else "not met")
            lines.append(f"| {r['figure']} | {r['value']:.3g} | {r['target'] or ''} | {met} |")
        if "note" in section.get("measured", {}):
            lines += ["", f"Note: {section['measured']['note']}."]
        if "agreement" in section:
            checks = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in section["agreement"].items())
            lines += ["", f"Agreement: {checks}."]
        lines.append("")
    return "\n".join(lines)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].replace("`", ""), formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--only", help=f"comma-separated sections to run (default all): {', '.join(SECTIONS)}")
    add("--model", default=DEFAULT_MODEL, help=f"base model (default {DEFAULT_MODEL}; tiny-llama for a quick check)")
    add("--out-dir", type=Path, default=None,
        help=f"where bench.json and bench.md go (default: {DEFAULT_OUT}, or its subfolder named after --model "
             "for another model, so that a quick check never replaces the committed bench)")
    add("--data-dir", default=None, help="the data mirror (default $LORACOMBENCH_DATA_DIR, else the hub)")
    add("--seed", type=seed_type, default=0, help="the row samples' seed")
    add("--tolerance", type=float, default=1e-3, help="largest log-likelihood difference that still agrees")
    add("--train-rows", type=positive_int, default=32, help="training rows per task (AG News and GSM8K)")
    add("--train-batch-size", type=positive_int, default=8, help="rows per optimizer step")
    add("--matmul-size", type=positive_int, default=2048, help="side of the square fp32 matmul that sets the peak")
    add("--score-rows", type=positive_int, default=96, help="AG News test articles scored")
    add("--score-batch-size", type=positive_int, default=None,
        help="rows per scoring pass (default: the default run's eval batch_size, "
             f"{EvalSettings().batch_size} unless configs/default.yaml sets it)")
    add("--label-tokens", type=positive_int, default=4, help="new tokens when generating the AG News label")
    add("--generate-rows", type=positive_int, default=16, help="GSM8K test prompts generated")
    add("--generate-batch-size", type=positive_int, default=16, help="prompts per batch")
    add("--max-new-tokens", type=positive_int, default=128, help="new tokens per GSM8K prompt at most")
    add("--adapters", type=positive_int, default=3, help="random adapters evaluated in the adapters section")
    add("--adapter-rows", type=positive_int, default=32, help="AG News test articles each adapter scores")
    add("--adapter-std", type=float, default=0.02, help="standard deviation of the random adapters' lora_B")
    add("--memory-rows", type=positive_int, default=16,
        help="longest training rows per task, trained with and without gradient checkpointing (memory)")
    bench_merge.add_arguments(parser)
    add("--run-log", type=Path, help="output of a finished `loracombench run` (its `stages:` line gives stage "
                                     "times), read instead of running the default run here")
    add("--cached-run-log", type=Path, help="with --run-log: output of the same run repeated with everything cached")
    add("--no-run", action="store_true", help="do not run the default run (the run section then reports no run)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = DEFAULT_OUT if args.model == DEFAULT_MODEL else DEFAULT_OUT / Path(args.model).name
    try:
        names = select_sections(args.only)
        if args.cached_run_log and not args.run_log:
            raise BenchError("--cached-run-log needs --run-log (without either, the bench runs both runs itself)")
        if args.no_run and args.run_log:
            raise BenchError("--no-run and --run-log contradict each other: give one")
        for log in (args.run_log, args.cached_run_log):  # a bad log fails now, not after the other sections
            if log is not None:
                read_run_log(log)
        if args.run_log is not None:
            default_preset_for(args.data_dir, read_run_log(args.run_log)["computed_cells"])
    except BenchError as err:
        parser.error(str(err))
    ctx = Context(args)
    result = {"setup": setup(args), "sections": {}}
    for name in names:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
        try:
            section, seconds = timed(lambda: SECTIONS[name](ctx))
        except BenchError as err:  # the sections before it are saved already
            parser.exit(2, f"{parser.prog}: error in section {name}: {err}\n")
        result["sections"][name] = {**section, "section_seconds": round(seconds, 1)}
        # Written after every section, so that a long bench cut short keeps what it measured.
        io.write_json(args.out_dir / "bench.json", result)
        io.write_text(args.out_dir / "bench.md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
