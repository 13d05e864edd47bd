"""The `eda` and `baseline` subcommands. The main CLI calls `add_parsers(subparsers)` and then
`args.func(args)`; handlers return an exit code and signal bad input with ValueError (DataError)."""

from __future__ import annotations

import argparse

DEFAULT_TOKENIZER = "smollm2-135m"


def _task_names() -> list[str]:
    from .tasks import TASKS

    return sorted(TASKS)


def _tasks_with_baselines() -> dict[str, list[str]]:
    from .baselines import baseline_names

    return {name: names for name in _task_names() if (names := baseline_names(name))}


def add_parsers(subparsers) -> None:
    from .cli import SAMPLE_HELP, add_out_args, count, seed_type
    from .config import EvalSettings

    eda = subparsers.add_parser(
        "eda",
        help="dataset statistics (JSON) and plots (PNG) for the tasks",
        description="Exploratory data analysis: the statistics and plots each task declares (its "
                    "module's eda_stats and eda_plots), and token-length percentiles of prompt+target "
                    "under the base model's tokenizer. Writes OUT/eda_stats.json (last) and OUT/*.png.")
    eda.add_argument("--task", nargs="+", choices=_task_names(), default=_task_names(),
                     metavar="TASK", help=f"tasks to analyse (default: all; choices: {', '.join(_task_names())})")
    eda.add_argument("--data-dir", help="local mirror folder (default: $LORACOMBENCH_DATA_DIR, else the hub)")
    add_out_args(eda, "output folder", required=True)
    eda.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                     help=f"base model whose tokenizer counts tokens (default: {DEFAULT_TOKENIZER})")
    eda.add_argument("--no-tokens", action="store_true",
                     help="skip the token-length statistics (no tokenizer is loaded)")
    eda.set_defaults(func=run_eda_command)

    with_baselines = _tasks_with_baselines()
    base = subparsers.add_parser(
        "baseline",
        help="classical baselines (TF-IDF classifiers, majority, nearest neighbour)",
        description="Fit the classical baselines a task declares on the train split and evaluate "
                    "them on the test split. "
                    + " ".join(f"{task}: {', '.join(names)}." for task, names in with_baselines.items())
                    + " Writes OUT/<baseline>/metrics.json and predictions.jsonl in the format of "
                      "model evaluations.")
    base.add_argument("--task", required=True, choices=list(with_baselines), help="task to evaluate")
    base.add_argument("--data-dir", help="local mirror folder (default: $LORACOMBENCH_DATA_DIR, else the hub)")
    base.add_argument("--n-train", type=count(1), default=None,
                      help=f"seeded sample of N training rows (default: all; {SAMPLE_HELP})")
    base.add_argument("--n-eval", type=count(1), default=None,
                      help=f"seeded sample of N test rows (default: all; {SAMPLE_HELP})")
    base.add_argument("--seed", type=seed_type, default=0,
                      help="training sample's and baselines' seed, a run's data_seed (default: 0)")
    base.add_argument("--eval-seed", type=seed_type, default=EvalSettings().seed,
                      help="test sample's seed, a run's eval.seed (default: %(default)s), so that a run's "
                           "sizes and seeds give its evaluation rows")
    add_out_args(base, "output folder", required=True)
    base.set_defaults(func=run_baseline_command)


def _load_tokenizer(name: str):
    try:
        from .models import load_tokenizer
    except ImportError as err:
        raise ValueError(f"cannot load the tokenizer ({err}); rerun with --no-tokens to skip "
                         "the token statistics") from err
    try:
        return load_tokenizer(name)
    except (OSError, ValueError) as err:  # transformers' and the hub's own messages name no flag
        raise ValueError(f"--tokenizer {name}: {err}") from None


def run_eda_command(args: argparse.Namespace) -> int:
    from . import eda
    from .io import atomic_dir, read_json
    from .data import resolve_data_dir
    from .outputs import check_out

    # Data first: a bad mirror fails at once, before the (slow) tokenizer loads.
    folder = resolve_data_dir(args.data_dir)
    check_out(args.out, "eda", overwrite=args.overwrite, inputs={"--data-dir": folder})
    loaded = eda.load_task_splits(args.task, folder)
    tokenizer = None if args.no_tokens else _load_tokenizer(args.tokenizer)
    with atomic_dir(args.out) as staging:
        written = eda.write_eda(loaded, staging, tokenizer, source=str(folder) if folder else "hub")
        record = read_json(written)
    path = args.out / written.name
    print(f"wrote {path} and {len(record['plots'])} plots in {args.out}")
    for stats in record["tasks"].values():
        for line in eda.summary_lines(stats):
            print(line)
    return 0


def run_baseline_command(args: argparse.Namespace) -> int:
    from .baselines import run_baselines
    from .data import load_sample, resolve_data_dir
    from .io import atomic_dir
    from .outputs import check_out
    from .tasks import get_task

    task = get_task(args.task)
    check_out(args.out, "baseline", overwrite=args.overwrite, inputs={"--data-dir": resolve_data_dir(args.data_dir)})
    train = load_sample(task, "train", args.n_train, args.seed, args.data_dir, what="--n-train")
    evaluation = load_sample(task, "test", args.n_eval, args.eval_seed, args.data_dir, what="--n-eval")
    with atomic_dir(args.out) as staging:
        written = run_baselines(task.name, train, evaluation, staging, seed=args.seed, split="test",
                                config={"n_train_requested": args.n_train, "n_eval_requested": args.n_eval})
    folders = [args.out / folder.name for folder in written]
    from .metrics import read_result

    print(f"{task.name}: {len(train)} train rows (seed {args.seed}), {len(evaluation)} test rows "
          f"(seed {args.eval_seed})")
    for folder in folders:
        record = read_result(folder)
        m = record["metrics"][record["primary_metric"]]
        print(f"  {folder.name:<26} {record['primary_metric']} {m['value']:.4f} "
              f"[{m['ci_low']:.4f}, {m['ci_high']:.4f}]  -> {folder}")
    return 0
