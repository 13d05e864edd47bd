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
from loracombench.config import load_config
from loracombench.models import load_tokenizer
from loracombench.pipeline import Experiment
from loracombench.tasks import get_task
from loracombench.training import IGNORE_INDEX, Example, loss_batches


def lost_by_wrapping_slice(batch: list[Example]) -> tuple[int, int]:
    """(targets the old slice left out, targets) of one batch."""
    spans = [sum(label != IGNORE_INDEX for label in e.labels) for e in batch]
    keep = min(1 + max(spans), max(len(e.input_ids) for e in batch))
    lost = 0
    for e, span in zip(batch, spans):
        tail = e.labels[len(e.labels) - (keep - 1):] if keep > 1 else []
        lost += span - sum(label != IGNORE_INDEX for label in tail)
    return lost, sum(spans)


def composition_batches(spec, tokenizer, experiment: Experiment, seed: int) -> list[list[Example]] | None:
    """The batches a composition takes the loss on (Composition.loss_batches), or None for one
    that takes none."""
    config = experiment.config
    composition = get_composition(spec.method, spec.params)
    if not composition.uses_target_loss:
        return None
    n = composition.needs().validation_per_task
    inputs = BuildInputs(experts={task: None for task in config.tasks}, seed=seed,
                         validation={t: experiment.validation_rows(t, n) for t in config.tasks} if n else {},
                         train_rows={t: experiment.train_rows(t) for t in config.tasks},
                         train_settings={t: config.train_settings(t, seed) for t in config.tasks})
    return composition.loss_batches(inputs, tokenizer)


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
                   loss_batches(tokenizer, [(get_task(task), experiment.train_rows(task))], settings))
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
