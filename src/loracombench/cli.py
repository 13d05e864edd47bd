"""The `loracombench` command: one entry point, a subcommand per step, --help everywhere.

Every user error ends the same way: exit status 2 and one line naming the flag, key or file,
the rule and the valid values, with nothing written. Outputs never replace data they were not
made for (see outputs.py); SIGTERM stops a command like Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from . import __version__

SAMPLE_HELP = "a size larger than the split is an error"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and each option's default after its help, unless the help already
    states it or there is none to state (a required option, a flag, an unset optional value)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or action.required or not action.option_strings
                or action.default in (None, argparse.SUPPRESS) or isinstance(action.default, bool)):
            return text
        return f"{text} (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line (exit status 2, as before), and every option's
    default in --help; subcommands' parsers are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def count(low: int, high: int | None = None):
    """An argparse type: an integer >= low (and <= high when given)."""
    allowed = f">= {low}" if high is None else f"from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {allowed}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {allowed}, got {value}")
        return value

    parse.__name__ = f"integer {allowed}"
    return parse


def seed_type(text: str) -> int:
    """An argparse type: a seed every generator here takes."""
    from .config import MAX_SEED

    return count(0, MAX_SEED)(text)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it stops as after Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _local_path(name: str | None) -> Path | None:
    """A --model that names a local folder is an input; a hub id or registered name is not."""
    return Path(name) if name and Path(name).exists() else None


def _data_input(data_dir) -> Path | None:
    from .data import resolve_data_dir

    return resolve_data_dir(data_dir)


def _data_mirror_guarded() -> dict:
    """The mirror named by $LORACOMBENCH_DATA_DIR, for a command that reads no data: its --out
    must not land in the mirror either."""
    from .data import DATA_DIR_ENV

    mirror = os.environ.get(DATA_DIR_ENV)
    return {f"${DATA_DIR_ENV}": Path(mirror).expanduser()} if mirror else {}


def _print_table(rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for row in rows:
        print("  ".join(str(row[k]).ljust(widths[k]) for k in keys))


# ---------------------------------------------------------------- models, data

def cmd_models(args) -> int:
    from .models import describe

    _print_table(describe())
    print("\nAny Hugging Face hub id or local folder also works (safetensors weights only).")
    return 0


def cmd_data(args) -> int:
    from .data import describe
    from .tasks import TASKS

    for task in TASKS.values():
        print(f"{task.name}: {task.description} (chance {task.chance:.2f}, metric {task.primary_metric})")
    print()
    _print_table(describe(args.data_dir))
    return 0


# ---------------------------------------------------------------- train, eval

def cmd_train(args) -> int:
    from pydantic import ValidationError

    from . import distributed
    from .checkpoint import check_checkpoint_dir
    from .config import ConfigError, TrainSettings, flatten_validation_error, load_config
    from .data import data_source, load_sample
    from .models import check_device, check_target_modules, load_model, resolve_dtype
    from .outputs import check_out
    from .tasks import get_task
    from .training import train_adapter

    task = get_task(args.task)
    out = check_out(args.out or Path("models") / task.name, "adapter", overwrite=args.overwrite,
                    inputs={"--data-dir": _data_input(args.data_dir), "--model": _local_path(args.model)})
    check_checkpoint_dir(out)
    preset = load_config()  # the default preset is the one source of the training defaults
    dtype = args.dtype or preset.dtype
    resolve_dtype(dtype, check_device(args.device))
    flags = {"r": args.r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
             "target_modules": args.target_modules, "learning_rate": args.lr, "epochs": args.epochs,
             "batch_size": args.batch_size, "grad_accum": args.grad_accum, "max_length": args.max_length,
             "seed": args.seed, "checkpoint_every": args.checkpoint_every,
             "gradient_checkpointing": args.gradient_checkpointing,
             "recompute_above_tokens": args.recompute_above_tokens, "loss_chunk_tokens": args.loss_chunk_tokens}
    defaults = preset.train_settings(task.name, preset.seeds[0]).model_dump()
    try:
        config = TrainSettings(**{**defaults, **{name: value for name, value in flags.items() if value is not None}})
    except ValidationError as err:
        names = {name: "--" + name.replace("_", "-") for name in flags} | {"learning_rate": "--lr"}
        raise ConfigError(flatten_validation_error(err, names=names)) from None
    rows = load_sample(task, "train", args.n_train, args.data_seed, args.data_dir, what="--n-train")
    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code)
    check_target_modules(loaded.model, config.target_modules, "--target-modules")
    with distributed.session(args.device) as world:
        meta = train_adapter(loaded, task, rows, config, out, args.device, dtype=dtype,
                             extra_metadata={"data_seed": args.data_seed, "data": data_source(args.data_dir)})
    if world.is_main:
        print(f"saved adapter to {out} (final loss {meta['final_loss']:.4f}, {meta['train_time_s']:.0f} s"
              f"{f', {world.size} processes' if world.size > 1 else ''})")
    return 0


def eval_settings(args, task: str, preset) -> dict:
    """The evaluation settings of `eval`: each flag given, else the default preset's (`preset`,
    its EvalSettings), so that an adapter evaluated alone is scored on the rows and settings of
    the default run's table."""
    from .evaluation import EvalConfig

    defaults = {"split": preset.split, "seed": preset.seed, "n_eval": preset.n_eval.get(task, EvalConfig.n_eval),
                "n_generate": preset.n_generate, "max_new_tokens": preset.max_new_tokens,
                "batch_size": preset.batch_size, "generate_batch_size": preset.generate_batch_size}
    return {name: default if getattr(args, name) is None else getattr(args, name) for name, default in defaults.items()}


def cmd_eval(args) -> int:
    from . import adapters, io
    from .data import load_sample
    from .cache import file_digest
    from .config import load_config
    from .evaluation import EvalConfig, evaluate
    from .models import check_device, dtype_name, load_model, resolve_dtype
    from .outputs import check_out
    from .tasks import get_task

    task = get_task(args.task)
    check_out(args.out, "eval", overwrite=args.overwrite,
              inputs={"--adapter": args.adapter, "--data-dir": _data_input(args.data_dir),
                      "--model": _local_path(args.model)})
    device = check_device(args.device)
    preset = load_config()  # the default preset is the one source of the evaluation defaults
    precision = dtype_name(resolve_dtype(args.dtype or preset.dtype, device))
    settings = eval_settings(args, task.name, preset.eval)
    rows = load_sample(task, settings["split"], settings["n_eval"], settings["seed"], args.data_dir, what="--n-eval")
    # Recorded as what was generated: never more than the rows evaluated (None: all of them).
    n_generate = len(rows) if settings["n_generate"] is None else min(settings["n_generate"], len(rows))
    config = EvalConfig(**{**settings, "n_generate": n_generate, "dtype": precision})
    if args.adapter:  # its error before the model's: the adapter is the likelier mistake, and cheap to read
        try:
            adapters.read_adapter(args.adapter)
        except (ValueError, OSError) as err:
            raise ValueError(f"--adapter: {err}") from None
    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code)
    model = adapters.apply_adapter(loaded, args.adapter) if args.adapter else loaded.model
    model.to(device)
    label = args.label or (Path(args.adapter).name if args.adapter else "base")
    info = {"label": label, "kind": "adapter" if args.adapter else "base", "base_model": loaded.fingerprint,
            "adapter": str(args.adapter) if args.adapter else None,
            # The path says where the adapter was, the hash which weights were scored.
            "adapter_weights_sha256": file_digest(Path(args.adapter) / adapters.WEIGHTS_FILE)["sha256"]
            if args.adapter else None}
    with io.atomic_dir(args.out) as staging:
        record = evaluate(model, loaded.tokenizer, task, rows, config, info, out_dir=staging)
    for name, value in record["metrics"].items():
        print(f"{name:>22}: {value['value']:.4f}  95% [{value['ci_low']:.4f}, {value['ci_high']:.4f}]  n={value['n']}")
    print(f"wrote {args.out}/metrics.json and predictions.jsonl")
    return 0


# ---------------------------------------------------------------- merge, diagnose

def _parse_key_values(pairs: list[str]) -> dict:
    params = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--param expects key=value, got {pair!r}")
        if key.strip() in params:
            raise ValueError(f"--param {key.strip()} is given twice ({params[key.strip()]!r} and {value.strip()!r}); "
                             f"give it once")
        params[key.strip()] = value.strip()
    return params


def cmd_merge(args) -> int:
    from .merging import METHODS

    if args.list:
        for method in METHODS.values():
            print(f"{method.name}: {method.summary}\n    reference: {method.reference}")
            for param in method.params:
                print(f"    --param {param.name}=<{param.kind.__name__}> (default {param.default!r}): {param.help}")
        return 0
    if not args.adapters or not args.out:
        raise ValueError("merge needs --adapters DIR [DIR ...] and --out DIR (or --list)")
    from .adapters import merge_adapter_dirs
    from .merging import MergeError
    from .merging.merge import checked_weights
    from .outputs import check_out

    check_out(args.out, "merge", overwrite=args.overwrite,
              inputs={"--adapters": args.adapters, **_data_mirror_guarded()})
    try:
        checked_weights(args.weights, len(args.adapters))
    except MergeError as err:
        raise ValueError(f"--weights: {err}") from None
    meta = merge_adapter_dirs(args.adapters, args.method, args.out, args.weights, _parse_key_values(args.param))
    print(f"merged {len(args.adapters)} adapters with {args.method} into {args.out}")
    print(json.dumps(meta["info"], indent=2, default=str))
    return 0


def cmd_diagnose(args) -> int:
    from . import io
    from .adapters import check_same_base, read_adapter
    from .merging.diagnostics import diagnose, plot_diagnostics

    from .outputs import check_out

    if len(args.adapters) < 2:
        raise ValueError(f"--adapters: diagnose compares at least two adapters, got {len(args.adapters)}")
    out = check_out(args.out, "diagnostics", overwrite=args.overwrite,
                    inputs={"--adapters": args.adapters, **_data_mirror_guarded()})
    loaded = [read_adapter(p) for p in args.adapters]
    check_same_base(loaded)
    if not set.intersection(*(set(a.factors) for a in loaded)):
        raise ValueError("the adapters share no module")
    # Every module, None where an adapter lacks it: diagnose lists those in skipped_modules.
    every = sorted(set.union(*(set(a.factors) for a in loaded)))
    result = diagnose({name: [a.factors.get(name) for a in loaded] for name in every})
    result["adapters"] = [str(a.path) for a in loaded]
    with io.atomic_dir(out) as staging:
        io.write_json(staging / "diagnostics.json", result)
        plot_diagnostics(result, staging / "diagnostics.png")
    print(json.dumps(result.get("overall", {}), indent=2, default=str))
    print(f"wrote {out}/diagnostics.json and diagnostics.png")
    return 0


# ---------------------------------------------------------------- run, report

def cmd_run(args) -> int:
    from .config import load_config
    from .executors import make_executor
    from .outputs import check_out
    from .pipeline import run_experiment

    executor = make_executor(args.executor, args.ray_address, args.workers)
    overrides = {}
    if args.data_dir:
        overrides["data_dir"] = str(args.data_dir)
    if args.model:
        overrides["model"] = args.model
    config = load_config(args.config, overrides)
    out = check_out(args.out or Path("runs") / config.name, "run",
                    inputs={"data_dir": _data_input(config.data_dir), "model": _local_path(config.model)})
    if args.executor == "ray":  # workers started elsewhere find the files by absolute paths only
        out = out.absolute()
        data, model = _data_input(config.data_dir), _local_path(config.model)
        if data:
            config = config.model_copy(update={"data_dir": str(data.absolute())})
        if model:
            config = config.model_copy(update={"model": str(model.absolute())})
    with contextlib.closing(executor):
        run_dir = run_experiment(config, out, trust_remote_code=args.trust_remote_code, executor=executor)
    print()
    print((run_dir / "results.md").read_text())
    print(f"results: {run_dir / 'results.csv'}, {run_dir / 'results.md'}; plot: {run_dir / 'results.png'}")
    return 0


def _sweep_config(args):
    from .config import load_config

    overrides = {"data_dir": str(args.data_dir)} if args.data_dir else {}
    return load_config(args.config, overrides)


def _validation_sizes(args, config) -> dict:
    return {task: args.n_validation for task in config.tasks}


def cmd_sweep(args) -> int:
    from .outputs import check_out
    from .pipeline import check_remote_code
    from .sweep import sweep_learning_rates

    config = _sweep_config(args)
    check_remote_code(config, args.trust_remote_code)
    if args.tasks:
        unknown = sorted(set(args.tasks) - set(config.tasks))
        if unknown:
            raise ValueError(f"--tasks {' '.join(unknown)}: not a task of the config; valid: {', '.join(config.tasks)}")
        config = config.model_copy(update={"tasks": args.tasks})
    bad = [rate for rate in args.learning_rates if not 0 < rate < float("inf")]
    if bad:
        raise ValueError(f"--learning-rates must be positive and finite, got {bad}")
    if len(set(args.learning_rates)) != len(args.learning_rates):
        raise ValueError(f"--learning-rates repeats a rate: {args.learning_rates}; each is trained once")
    out = check_out(args.out or Path("runs") / f"{config.name}-lr-sweep", "sweep",
                    inputs={"--data-dir": _data_input(args.data_dir)})
    summary = sweep_learning_rates(config, args.learning_rates, out, _validation_sizes(args, config))
    print((out / "sweep.md").read_text())
    for task, result in summary["tasks"].items():
        print(f"{task}: best learning rate on validation {result['best_learning_rate']:g}")
    return 0


def cmd_verbalizers(args) -> int:
    from .outputs import check_out
    from .pipeline import check_remote_code
    from .sweep import compare_verbalizers

    config = _sweep_config(args)
    check_remote_code(config, args.trust_remote_code)
    candidates = verbalizer_candidates(args.task, args.candidates)
    out = check_out(args.out or Path("runs") / f"{config.name}-verbalizers", "verbalizers", overwrite=args.overwrite,
                    inputs={"--data-dir": _data_input(args.data_dir)})
    compare_verbalizers(config, args.task, candidates, args.n_validation, out)
    print((out / "verbalizers.md").read_text())
    return 0


def verbalizer_candidates(task_name: str, texts: list[str]) -> list[tuple[str, ...]]:
    """--candidates as label tuples, each checked by the task itself before any model loads."""
    from .tasks import get_task

    task = get_task(task_name)
    if task.kind != "multiple_choice":
        raise ValueError(f"--task {task_name}: verbalizers compares the label words of a multiple-choice task; "
                         f"{task_name} is scored by generation")
    candidates = []
    for text in texts:
        labels = tuple(label.strip() for label in text.split(","))
        if not all(labels):
            raise ValueError(f"--candidates {text!r}: a label is empty")
        try:
            type(task)(labels=labels)
        except (TypeError, ValueError) as err:
            raise ValueError(f"--candidates {text!r}: {err}") from None
        candidates.append(labels)
    return candidates


def cmd_report(args) -> int:
    from .report import build_report

    run_dir = build_report(args.run_dir, partial=args.partial)
    print((run_dir / "results.md").read_text())
    print(f"plot: {run_dir / 'results.png'}")
    return 0


# ---------------------------------------------------------------- parser

def _add_model_args(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="base model: a registered name (see `loracombench models`), hub id or local folder")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow custom model code from the hub (off by default)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")


def _add_dtype_arg(parser, preset: str) -> None:
    parser.add_argument("--dtype", default=None,
                        help=f"forward-pass precision: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 (runs on CPU, "
                             f"but slowly without AVX-512 bf16) or fp16 (CUDA only) {preset}")


def _add_remote_code_consent(parser) -> None:
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow custom model code when the config sets trust_remote_code: true "
                             "(a config that does is refused without this flag)")


def _add_data_arg(parser) -> None:
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="local mirror in the HF schema (default: $LORACOMBENCH_DATA_DIR, else the hub)")


def add_out_args(parser, help: str, required: bool = False, default=None) -> None:
    """--out and --overwrite: an existing output of the same kind is replaced only when asked."""
    parser.add_argument("--out", type=Path, required=required, default=default,
                        help=f"{help}; must not exist yet, be empty, or (with --overwrite) hold an earlier "
                             f"output of the same command")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier output of this command at --out (never anything else)")


def _command(sub, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose --help opens with its one-line summary unless it has a longer description."""
    kwargs.setdefault("description", help[0].upper() + help[1:] + ".")
    return sub.add_parser(name, help=help, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from .cli_analysis import add_parsers as add_analysis_parsers
    from .executors import EXECUTORS, RAY_EXTRA

    parser = OneLineParser(prog="loracombench", description=__doc__)
    parser.add_argument("--version", action="version", version=f"loracombench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "models", help="list the registered base models")
    p.set_defaults(func=cmd_models)

    p = _command(sub, "data", help="show each task's splits, sizes and source")
    _add_data_arg(p)
    p.set_defaults(func=cmd_data)

    preset = "(default: configs/default.yaml's)"
    p = _command(sub, "train", help="train one LoRA adapter on one task",
                       description="Train one LoRA adapter. Every unset training setting is the default preset's "
                                   "(configs/default.yaml, train and train_per_task). Data-parallel over several "
                                   "processes or GPUs when started by torchrun: torchrun --nproc_per_node N -m "
                                   "loracombench.cli train ... (same global batch as one process).")
    p.add_argument("--task", required=True, help="ag_news or gsm8k")
    _add_model_args(p)
    _add_dtype_arg(p, preset)
    _add_data_arg(p)
    p.add_argument("--n-train", type=count(1), default=None,
                   help=f"seeded (stratified) training sample; default all ({SAMPLE_HELP})")
    p.add_argument("--data-seed", type=seed_type, default=0, help="seed of the training sample")
    p.add_argument("--epochs", type=int, default=None, help=preset)
    # torchrun's parser reads `--r` as an abbreviation of its own options: --lora-rank passes through.
    p.add_argument("--r", "--lora-rank", dest="r", type=int, default=None,
                   help=f"LoRA rank {preset}; under torchrun write --lora-rank")
    p.add_argument("--lora-alpha", type=float, default=None, help=preset)
    p.add_argument("--lora-dropout", type=float, default=None, help=preset)
    p.add_argument("--target-modules", nargs="+", default=None, help="default: chosen per architecture")
    p.add_argument("--lr", type=float, default=None, help=f"learning rate {preset}")
    p.add_argument("--batch-size", type=int, default=None, help=f"examples per micro-batch {preset}")
    p.add_argument("--grad-accum", type=int, default=None, help=f"micro-batches per optimizer step {preset}")
    p.add_argument("--max-length", type=int, default=None, help=f"tokens per example (cut on the right) {preset}")
    p.add_argument("--seed", type=seed_type, default=None, help="training seed (default: configs/default.yaml's seeds[0])")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="optimizer steps between checkpoints in OUT.checkpoint/, from which a rerun resumes "
                        f"(0: none) {preset}")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help=f"recompute activations in the backward pass: less memory, slower, the same adapter {preset}")
    p.add_argument("--recompute-above-tokens", type=int, default=None, metavar="N",
                   help="micro-batches of more tokens (rows x longest row) recompute just enough layers to keep N "
                        f"tokens' worth of activations; the same adapter {preset}")
    p.add_argument("--loss-chunk-tokens", type=int, default=None, metavar="N",
                   help="project the target positions onto the vocabulary N at a time, recomputed in the backward "
                        "pass: less memory, gradients equal up to float rounding (default: the model's own forward)")
    add_out_args(p, "adapter folder (default models/<task>)")
    p.set_defaults(func=cmd_train)

    p = _command(sub, "eval", help="evaluate the base model or an adapter on one task",
                       description="Evaluate the base model or an adapter on one task. Every unset evaluation "
                                   "setting is the default preset's, so the rows and settings are those of the "
                                   "default run's table.")
    p.add_argument("--task", required=True, help="ag_news or gsm8k")
    _add_model_args(p)
    _add_dtype_arg(p, preset)
    _add_data_arg(p)
    p.add_argument("--adapter", type=Path, default=None, help="PEFT adapter folder (default: the base model)")
    p.add_argument("--label", default=None,
                   help="name of the model in the result file (default: the adapter folder's name, or base)")
    p.add_argument("--split", default=None, help=f"the split scored (a run scores test) {preset}")
    p.add_argument("--n-eval", type=count(1), default=None,
                   help=f"examples scored (seeded sample; {SAMPLE_HELP}) {preset}")
    p.add_argument("--n-generate", type=count(0), default=None,
                   help=f"GSM8K: problems answered by generation (a prefix of the sample; 0: none) {preset}")
    p.add_argument("--max-new-tokens", type=count(1), default=None,
                   help=f"GSM8K: the most tokens a generated answer may have {preset}")
    p.add_argument("--batch-size", type=count(1), default=None, help=f"rows per log-likelihood forward pass {preset}")
    p.add_argument("--generate-batch-size", type=count(1), default=None,
                   help=f"GSM8K: prompts generated together {preset}")
    p.add_argument("--seed", type=seed_type, default=None, help=f"seed of the evaluation sample {preset}")
    add_out_args(p, "folder for metrics.json and predictions.jsonl", required=True)
    p.set_defaults(func=cmd_eval)

    p = _command(sub, "merge", help="merge adapters with a registered method (no base model needed)")
    p.add_argument("--method", default="average", help="merge method (see --list)")
    p.add_argument("--adapters", nargs="+", type=Path, help="adapter folders, same base model (required unless --list)")
    p.add_argument("--weights", nargs="+", type=float, default=None,
                   help="one weight per adapter (default: 1 each; average normalises them)")
    p.add_argument("--param", action="append", default=None, metavar="KEY=VALUE",
                   help="method parameter, repeatable (default: the method's defaults, see --list)")
    add_out_args(p, "folder of the merged PEFT adapter (required unless --list)")
    p.add_argument("--list", action="store_true", help="list methods, their parameters and references")
    p.set_defaults(func=cmd_merge)

    p = _command(sub, "diagnose", help="interference diagnostics between adapters (JSON + plot)")
    p.add_argument("--adapters", nargs="+", type=Path, required=True,
                   help="two or more adapter folders on the same base model")
    add_out_args(p, "folder for diagnostics.json and diagnostics.png", required=True)
    p.set_defaults(func=cmd_diagnose)

    p = _command(sub, "run", help="the whole experiment: train, merge, evaluate, report (resumable)")
    p.add_argument("--config", default=None, help="preset name in configs/ or a YAML file (default: default)")
    p.add_argument("--model", default=None, help="override the config's base model (default: the config's)")
    _add_remote_code_consent(p)
    _add_data_arg(p)
    p.add_argument("--out", type=Path, default=None,
                   help="run folder (default runs/<config name>); an earlier run folder is resumed, "
                        "anything else must be new or empty. Sample sizes larger than a split are an error")
    p.add_argument("--workers", type=count(1), default=1,
                   help="run each stage's cells in this many local processes, sharing the CPU threads "
                        "(default 1: every cell in this process; on 2 cores more workers were slower). "
                        "Numbers match a 1-worker run up to floating-point summation order")
    p.add_argument("--executor", choices=EXECUTORS, default="serial",
                   help="serial: one cell after another in this process; ray: each stage's cells as Ray tasks "
                        f"(optional extra: {RAY_EXTRA}). Every Ray worker writes the run folder itself, so all "
                        "machines must see it at the same path (a shared filesystem); the lock stays here")
    p.add_argument("--ray-address", default=None,
                   help="with --executor ray: an existing cluster (\"auto\", \"ray://host:10001\"); "
                        "default: start a local Ray on this machine. A cell that runs the model gets one GPU "
                        "when the cluster has GPUs")
    p.set_defaults(func=cmd_run)

    p = _command(sub, "sweep", help="choose each task's learning rate on validation data (never test)")
    p.add_argument("--config", default=None,
                   help="preset name or YAML file; everything but the rate is kept (default: default)")
    p.add_argument("--learning-rates", nargs="+", type=float, required=True, metavar="LR",
                   help="the rates to train each task's expert with, each once")
    p.add_argument("--tasks", nargs="+", default=None, help="default: the config's tasks")
    p.add_argument("--n-validation", type=count(1), default=None,
                   help="validation rows per task (default: all; GSM8K: train rows outside the training sample)")
    _add_data_arg(p)
    _add_remote_code_consent(p)
    p.add_argument("--out", type=Path, default=None,
                   help="sweep folder (default runs/<config name>-lr-sweep); an earlier sweep there is resumed")
    p.set_defaults(func=cmd_sweep)

    p = _command(sub, "verbalizers", help="base-model validation scores of candidate label words")
    p.add_argument("--config", default=None, help="preset name or YAML file (model, data) (default: default)")
    p.add_argument("--task", default="ag_news", help="a multiple-choice task")
    p.add_argument("--candidates", nargs="+", required=True, metavar="A,B,C,D",
                   help="label sets, comma-separated, in the task's label order")
    p.add_argument("--n-validation", type=count(1), default=None, help="validation rows (default: all)")
    _add_data_arg(p)
    _add_remote_code_consent(p)
    add_out_args(p, "folder (default runs/<config name>-verbalizers)")
    p.set_defaults(func=cmd_verbalizers)

    p = _command(sub, "report", help="rebuild results.csv/.md/.png of a run folder from its result files")
    p.add_argument("run_dir", type=Path, help="the folder of a finished `loracombench run`")
    p.add_argument("--partial", action="store_true",
                   help="report an unfinished run's results so far (the table then says it is partial)")
    p.set_defaults(func=cmd_report)

    add_analysis_parsers(sub)
    return parser


def _one_line(err: BaseException) -> str:
    from pydantic import ValidationError

    from .config import flatten_validation_error

    if isinstance(err, ValidationError):
        return flatten_validation_error(err)
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def _refuse_torchrun_unless_data_parallel(command: str) -> None:
    """Under torchrun every process runs the command: only `train` divides its work among them."""
    from .distributed import launched

    if launched() and command != "train":
        raise ValueError(f"`{command}` does not run data-parallel; under torchrun only `train` does. "
                         f"Run `loracombench {command}` as one process")


# What an interrupted command leaves, by command; every other command leaves nothing half-written.
INTERRUPTED = {
    "run": "finished cells are kept and a rerun resumes from them",
    "sweep": "finished cells are kept and a rerun resumes from them",
    "train": "a checkpoint saved before it (every --checkpoint-every steps) stays beside --out as "
             "<out>.checkpoint/, and the same command resumes from it",
}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:  # Ctrl-C while the parser's imports load: nothing has started
        print("interrupted before any work started; nothing was written", file=sys.stderr)
        return 130
    with _sigterm_as_interrupt():
        try:
            _refuse_torchrun_unless_data_parallel(args.command)
            return args.func(args)
        except (ValueError, RuntimeError, OSError) as err:
            print(f"loracombench {args.command}: error: {_one_line(err)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as stop:
            what = "terminated" if isinstance(stop, Terminated) else "interrupted"
            print(f"{what}; {INTERRUPTED.get(args.command, 'nothing half-written was left')}", file=sys.stderr)
            return 143 if isinstance(stop, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
