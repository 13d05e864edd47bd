"""How many of each weight sweep's validation rows the preset's other compositions were fitted on.

The run places every composed model on each sweep's validation rows (placed.json, pareto_all.png).
A composition that trains or searches on validation rows (LoRA Soups, LoraHub) draws them from
the same split, so some of the sweep's rows can be among its own: there its placement is
in-sample. Placements record the count since 2026-11-29 (`fitted_on_rows`); this prints it for a
preset from the data alone, with the rows the run draws (Experiment.validation_rows and the
sweep's own WeightSweep.validation_rows). Loads no model.

    python scripts/placement_overlap.py composition
"""

from __future__ import annotations

import argparse
import tempfile

from loracombench.compose import get_composition
from loracombench.compose.base import BuildInputs
from loracombench.compose.weight_sweep import WeightSweep, rows_fitted_on
from loracombench.config import load_config
from loracombench.pipeline import Experiment


def rows_drawn(experiment: Experiment, composition) -> dict[str, list[dict]]:
    n = composition.needs().validation_per_task
    return {task: experiment.validation_rows(task, n) for task in experiment.config.tasks} if n else {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("presets", nargs="+", help="preset names or config files")
    args = parser.parse_args(argv)
    print("| preset | sweep | composition | fitted on the sweep's rows |")
    print("| --- | --- | --- | --- |")
    for preset in args.presets:
        config = load_config(preset)
        with tempfile.TemporaryDirectory() as scratch:
            experiment = Experiment(config, scratch, progress=False)
            built = [(spec.name, get_composition(spec.method, spec.params)) for spec in config.compositions]
            for sweep_name, sweep in built:
                if not isinstance(sweep, WeightSweep):
                    continue
                inputs = BuildInputs(experts={task: None for task in config.tasks}, seed=config.seeds[0],
                                     validation=rows_drawn(experiment, sweep))
                sweep_rows = sweep.validation_rows(inputs)
                for name, composition in built:
                    fitted = rows_drawn(experiment, composition)
                    if fitted and not isinstance(composition, WeightSweep):  # sweeps are not placed
                        counts = rows_fitted_on(sweep_rows, fitted)
                        text = ", ".join(f"{c['fitted']} of {c['rows']} {task}" for task, c in counts.items())
                        print(f"| {preset} | {sweep_name} | {name} | {text} |")


if __name__ == "__main__":
    main()
