"""How many target tokens the training loss left out before the fix of TARGET_LOSS_VERSION 2.

Until then `training.collate` kept each row's last (keep - 1) labels, keep - 1 being the batch's
longest target span, as `labels[len(labels) - (keep - 1):]`. For a row shorter than keep - 1 the
start was negative and wrapped around, so the row's earlier targets were never scored. This
replays every batch the loss is taken on in a preset (each expert, and each composition that
declares `uses_target_loss`), built by the functions the run builds them with, and counts the
targets that slice would have left out. Reads the data and the tokenizer only; trains nothing.

    python scripts/lost_targets.py default composition
"""

from __future__ import annotations

import argparse
import tempfile

from loracombench.compose import get_composition
from loracombench.compose.base import BuildInputs
from loracombench.compose.lorahub import loss_batches
from loracombench.config import load_config
from loracombench.models import load_tokenizer
from loracombench.pipeline import Experiment
from loracombench.tasks import get_task
from loracombench.training import IGNORE_INDEX, Example, encode_rows, plan_steps


def lost_by_wrapping_slice(batch: list[Example]) -> tuple[int, int]:
    """(targets the old slice left out, targets) of one batch."""
    spans = [sum(label != IGNORE_INDEX for label in e.labels) for e in batch]
    keep = min(1 + max(spans), max(len(e.input_ids) for e in batch))
    lost = 0
    for e, span in zip(batch, spans):
        tail = e.labels[len(e.labels) - (keep - 1):] if keep > 1 else []
        lost += span - sum(label != IGNORE_INDEX for label in tail)
    return lost, sum(spans)


def planned_batches(examples: list[Example], settings) -> list[list[Example]]:
    return [[examples[i] for i in micro] for _, micro_batches in plan_steps(examples, settings)
            for micro in micro_batches]


def encoded(tokenizer, experiment: Experiment, tasks: list[str], max_length: int) -> list[Example]:
    return [e for task in tasks for e in encode_rows(tokenizer, get_task(task), experiment.train_rows(task), max_length)
            if e is not None]


def composition_batches(spec, tokenizer, experiment: Experiment, seed: int) -> list[list[Example]] | None:
    """The batches a composition takes the loss on, or None for one that takes none."""
    config = experiment.config
    composition = get_composition(spec.method, spec.params)
    if not composition.uses_target_loss:
        return None
    n = composition.needs().validation_per_task
    inputs = BuildInputs(experts={task: None for task in config.tasks}, seed=seed,
                         validation={t: experiment.validation_rows(t, n) for t in config.tasks} if n else {},
                         train_settings={t: config.train_settings(t, seed) for t in config.tasks})
    if spec.method == "multitask":
        settings = composition.settings(inputs)
        # train_multitask_adapter takes the tasks in name order.
        return planned_batches(encoded(tokenizer, experiment, sorted(config.tasks), settings.max_length), settings)
    if spec.method == "lora_soups":
        return planned_batches(composition.examples(inputs, tokenizer)[0], composition.train_settings(seed))
    if spec.method == "lorahub":
        return [batch for batches in loss_batches(tokenizer, composition.validation_rows(inputs)).values()
                for batch in batches]
    raise ValueError(f"{spec.method!r} uses the target loss, but this script does not know its batches")


def report(preset: str, what: str, batches: list[list[Example]]) -> None:
    counts = [lost_by_wrapping_slice(batch) for batch in batches]
    lost, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
    print(f"| {preset} | {what} | {lost:,} of {total:,} | {sum(c[0] > 0 for c in counts)} of {len(counts)} |")


def replay(preset: str, config) -> None:
    """One table row per expert and per composition that takes the loss, for each seed."""
    tokenizer = load_tokenizer(config.model, trust_remote_code=False)
    experiment = Experiment(config, tempfile.gettempdir(), progress=False)
    for seed in config.seeds:
        for task in config.tasks:
            settings = config.train_settings(task, seed)
            report(preset, f"expert {task}, seed {seed}",
                   planned_batches(encoded(tokenizer, experiment, [task], settings.max_length), settings))
        for spec in config.compositions:
            batches = composition_batches(spec, tokenizer, experiment, seed)
            if batches is not None:
                report(preset, f"{spec.name}, seed {seed}", batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("presets", nargs="+", help="config presets or YAML files")
    args = parser.parse_args()
    try:  # every preset is read first, so that a bad name fails before any output
        configs = {preset: load_config(preset) for preset in args.presets}
    except (ValueError, OSError) as err:
        parser.error(str(err))
    print("| preset | training | targets lost | batches hit |\n| --- | --- | --- | --- |")
    try:
        for preset, config in configs.items():
            replay(preset, config)
    except (ValueError, OSError) as err:  # e.g. no data mirror and no hub: the table stops there
        parser.error(f"{err} (the table above is incomplete)")


if __name__ == "__main__":
    main()
