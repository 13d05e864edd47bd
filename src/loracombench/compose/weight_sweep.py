"""Weight sweeps: a static merge's weights or parameters chosen on validation data.

A merge's result swings with its weights (FusionBench's task-arithmetic sweep on Flan-T5 drops
MNLI from 59.0 to 2.2 between λ = 0.2 and 0.5: Tang et al. 2024, "FusionBench: A Comprehensive
Benchmark of Deep Model Fusion", arXiv:2406.03280), so one hand-picked point proves little. The
papers themselves choose these on held-out validation data: task arithmetic's scaling
(Ilharco et al. 2023, arXiv:2212.04089) and TIES' density and λ (Yadav et al. 2023,
arXiv:2306.01708). This composition scores every point of a grid on each task's validation rows
and keeps the best one; the pipeline then evaluates that merged adapter on test like any other.

The grid's axes:
- `weights`: the values each expert's weight takes (the grid is their product over the experts),
  or in Python one list of values per expert, in the experts' order;
- `scale`: one weight shared by all experts (for methods without a scaling parameter of their own:
  dare_linear, dare_ties; for TIES a scale c > 0 is λ = c exactly);
- any parameter of the merge method given as a list (ties: density, lam); a scalar fixes it.
With no axis given, a method with a default grid (DEFAULT_GRIDS) takes it.

The choice: each point's score on a task is the task's retention metric (Task.retention_metric)
normalised to retention, (score − base)/(expert − base), which is 1 at the expert and 0 at the
base in either direction (for an NLL the gains are both negative and their ratio is the same
number). Base and experts are scored on the same rows: for task_arithmetic the grid's corner
points are them (λ·w = 0 is the base exactly; λ·w = eᵢ is expert i up to the rounding of one
matmul over concatenated factors, see test_weight_sweep), otherwise they are scored directly.
A task whose expert does not move its score off the base has no retention and is left out of the
objective (sweep.json lists the tasks in it). The selection rule combines the tasks' retentions
(SELECTION_RULES); ties go to the first point in grid order.

Each point is folded into the borrowed base in memory (W₀ + ΔW, computed as PEFT's merge
computes it), so a point scores on validation as its saved adapter scores under
SharedBase.with_adapter; nothing is written per point. Outputs: the chosen adapter, sweep.json
(every point: parameters, validation metrics, retentions, Pareto membership), validation.json
(the rows, so other models can be placed on the same plot: score_composed) and pareto.png.

Other models are placed after the build (the pipeline's place stage): each is scored on the same
validation rows and ranked within the grid (place: placed/<model>/placement.json), and
write_placements lists them all (placed.json) and redraws the plot with every one of them
(pareto_all.png), leaving the build's own files untouched.
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .. import adapters, io, metrics, stats
from ..config import stable_hash
from ..data import row_key
from ..evaluation import SCORERS, EvalConfig, evaluate_composed
from ..merging.factors import LoraFactors
from ..tasks import Task, get_task
from .base import BuildInputs, Composed, Composition, Needs, OneModel
from .static_merge import ADAPTER_DIR

SWEEP_FILE = "sweep.json"
DIRECT = "scored directly"
VALIDATION_FILE = "validation.json"
PLOT_FILE = "pareto.png"
PLACED_DIR = "placed"  # one folder per placed model, each a cell of the pipeline
PLACEMENT_FILE = "placement.json"
PLACED_FILE = "placed.json"
PLOT_ALL_FILE = "pareto_all.png"
# Issue 8's target for LoraHub: within the grid's best 10% of points (grid_rank <= 0.1).
BEST_SHARE = 0.1
WEIGHT_AXES = ("weights", "scale")
# Rows per task when n_validation is not given: accuracy over 4 labels needs more rows than a
# per-token NLL, and a generation task's rows are several times longer.
DEFAULT_N_VALIDATION = {"multiple_choice": 50, "generation": 20}
# Each point costs one scoring of every task's validation rows (composition.json's metadata times it): on
# the default run's 2 CPU cores about as long as evaluating a model on 50 + 20 test rows, so the
# default grids stay near 12-16 points; pass a finer grid for a finer picture. Weights above 1 are
# included: with the other expert's update added, an expert's own weight can need more than 1 to
# recover its task (and LoraHub searches up to 1.5).
DEFAULT_GRIDS = {
    "task_arithmetic": {"weights": [0.0, 0.5, 1.0, 1.5]},
    # TIES and DARE-TIES average the agreeing entries, so a scale above 1 restores a sum where the
    # experts overlap; DARE-linear sums, as task arithmetic does.
    "ties": {"density": [0.1, 0.2, 0.5, 1.0], "lam": [0.5, 1.0, 1.5]},
    "dare_ties": {"density": [0.1, 0.3, 0.5, 0.9], "scale": [0.5, 1.0, 1.5]},
    "dare_linear": {"density": [0.1, 0.3, 0.5, 0.9], "scale": [0.5, 0.75, 1.0]},
}


class WeightSweepError(ValueError):
    """Parameters, experts or validation data that the sweep cannot use."""


# ---------------------------------------------------------------- pure parts: selection, Pareto front

def mean_retention(retentions: list[float]) -> float:
    return float(np.mean(retentions))


def min_retention(retentions: list[float]) -> float:
    return float(np.min(retentions))


# rule -> how a point's retentions on the tasks in the objective combine into one number
SELECTION_RULES: dict[str, Callable[[list[float]], float]] = {
    "mean_retention": mean_retention,  # the average share of the experts' gains kept
    "min_retention": min_retention,  # the worst-served task's share (max-min)
}


def retention(value: float, base: float, expert: float, higher_is_better: bool) -> float | None:
    """(value − base)/(expert − base), None where the expert does not improve on the base: a
    negative gain would rank the points that lose most as keeping most (as stats.retention)."""
    expert_gain = stats.gain(base, expert, higher_is_better)
    if expert_gain <= 0:
        return None
    return stats.gain(base, value, higher_is_better) / expert_gain


def task_retention(task: str, value: float, references: dict) -> float | None:
    """A point's retention on `task` against the sweep's base and that task's expert."""
    return retention(value, references["base"][task], references["experts"][task][task],
                     described_metric(get_task(task))["higher_is_better"])


def objective(point_metrics: dict[str, float], references: dict, tasks: list[str], rule: str) -> float:
    """The selection rule over the retentions on `tasks`; -inf where it is not a finite number,
    so a diverged point is never chosen."""
    values = [task_retention(t, point_metrics[t], references) for t in tasks]
    value = SELECTION_RULES[rule](values)
    return value if math.isfinite(value) else -math.inf


def tasks_with_retention(references: dict, tasks: list[str]) -> list[str]:
    return [t for t in tasks if task_retention(t, references["experts"][t][t], references) is not None]


def choose(points_metrics: list[dict[str, float]], references: dict, tasks: list[str], rule: str) -> tuple[int, list[float]]:
    """The index of the first point with the highest objective, and every point's objective."""
    scores = [objective(m, references, tasks, rule) for m in points_metrics]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return best, scores


def pareto_front(points: Sequence[Sequence[float]], higher_is_better: Sequence[bool]) -> list[int]:
    """Indices (in input order) of the points no other point dominates: at least as good on every
    coordinate and better on one. Equal points do not dominate each other, so all of them stay.
    A NaN coordinate counts as the worst value of its coordinate."""
    if not points:
        return []
    wrong = [i for i, p in enumerate(points) if len(p) != len(higher_is_better)]
    if wrong:
        raise ValueError(f"point {wrong[0]} has {len(points[wrong[0]])} coordinates, higher_is_better has "
                         f"{len(higher_is_better)}")
    signs = np.where(np.asarray(higher_is_better, dtype=bool), 1.0, -1.0)
    oriented = np.asarray(points, dtype=float) * signs
    oriented = np.where(np.isnan(oriented), -np.inf, oriented)
    at_least = (oriented[:, None, :] >= oriented[None, :, :]).all(axis=2)  # [j, i]: j at least as good as i
    better = (oriented[:, None, :] > oriented[None, :, :]).any(axis=2)
    dominated = (at_least & better).any(axis=0)
    return [int(i) for i in np.flatnonzero(~dominated)]


def grid_rank(sweep: dict | str | Path, point_metrics: dict[str, float]) -> float:
    """The fraction of the sweep's grid points at least as good as a model with these validation
    metrics, by the sweep's own objective: 0.1 or less means within the grid's best 10% (a model
    better than every point gets 0). The metrics must come from the sweep's rows (score_composed)."""
    sweep = read_sweep(sweep)
    value = objective(point_metrics, sweep["references"], sweep["tasks_in_objective"], sweep["selection"])
    scores = [-math.inf if p["objective"] is None else p["objective"] for p in sweep["points"]]
    return stats.grid_share(value, scores, higher_is_better=True)


def read_sweep(sweep: dict | str | Path) -> dict:
    """sweep.json's content, from the dict, the file or the built folder."""
    if isinstance(sweep, dict):
        return sweep
    path = Path(sweep)
    return io.read_json(path / SWEEP_FILE if path.is_dir() else path)


# ---------------------------------------------------------------- the grid

def expert_weight_values(weights, n_experts: int) -> list[list[float]]:
    """One list of values per expert: the same list for all, or one per expert (checked arity)."""
    if all(isinstance(w, (list, tuple)) for w in weights):
        if len(weights) != n_experts:
            raise WeightSweepError(f"composition 'weight_sweep': weights gives {len(weights)} lists of values for "
                                   f"{n_experts} experts; give one list per expert, or one list for all")
        return [list(values) for values in weights]
    return [list(weights)] * n_experts


def grid_points(axes: dict, fixed: dict, n_experts: int) -> list[dict]:
    """Every combination of the axes' values, in a fixed order: weights (or scale) first, then the
    merge parameters in the order given. Each point: its expert weights and merge parameters."""
    if "weights" in axes:
        weight_options = list(itertools.product(*expert_weight_values(axes["weights"], n_experts)))
    elif "scale" in axes:
        weight_options = [(c,) * n_experts for c in axes["scale"]]
    else:
        weight_options = [(1.0,) * n_experts]
    names = [name for name in axes if name not in WEIGHT_AXES]
    return [{"weights": [float(w) for w in weights], "params": {**fixed, **dict(zip(names, values))}}
            for weights in weight_options for values in itertools.product(*(axes[n] for n in names))]


def reference_role(method: str, point: dict) -> str | int | None:
    """What a task-arithmetic point is exactly: "base" where λ·w = 0, expert i where λ·w = eᵢ."""
    if method != "task_arithmetic":
        return None
    effective = [point["params"].get("lam", 1.0) * w for w in point["weights"]]
    if all(w == 0 for w in effective):
        return "base"
    ones = [i for i, w in enumerate(effective) if w == 1]
    if len(ones) == 1 and all(w == 0 for i, w in enumerate(effective) if i != ones[0]):
        return ones[0]
    return None


# ---------------------------------------------------------------- scoring on validation rows

def validation_config(task: Task, dtype: str) -> EvalConfig:
    """Scoring settings that compute the task's retention metric and nothing slower: generation
    only when that metric counts generated answers."""
    metric = task.report_metric(task.retention_metric)
    generates = task.kind == "generation" and metric.field in task.generation_metrics.values()
    return EvalConfig(n_eval=None, n_generate=None if generates else 0, split="validation", dtype=dtype)


def metric_value(task: Task, predictions: list[dict]) -> float:
    """The task's retention metric over these predictions, as the report's retention computes it."""
    from ..report import paired_outputs

    metric = task.report_metric(task.retention_metric)
    (outputs,), gold = paired_outputs(metric, {p["index"]: p for p in predictions})
    if not outputs:
        raise WeightSweepError(f"{task.name}: no prediction carries {metric.name}'s field")
    score = stats.score_of(metric.paired, outputs, gold=gold, n_classes=metric.n_classes)
    return float(score(np.ones((1, len(outputs))))[0])


def score_model(model, tokenizer, rows: dict[str, list[dict]], dtype: str) -> dict[str, float]:
    """Each task's retention metric of one model on its validation rows."""
    values = {}
    for name, task_rows in rows.items():
        task = get_task(name)
        predict, _ = SCORERS[task.kind]
        predictions = predict(model, tokenizer, task, task_rows, range(len(task_rows)),
                              validation_config(task, dtype), False)
        values[name] = metric_value(task, predictions)
    return values


def score_composed(composed: Composed, shared, sweep_dir: str | Path, label: str = "model") -> dict[str, float]:
    """Any composed model (an expert, a router, LoraHub, the multitask adapter) scored on the
    sweep's validation rows exactly as its points were: metrics to place it on the plot
    (plot_pareto's `others`) or to rank it against the grid (grid_rank)."""
    sweep_dir = Path(sweep_dir)
    rows, sweep = io.read_json(sweep_dir / VALIDATION_FILE), read_sweep(sweep_dir)
    values = {}
    for name, task_rows in rows.items():
        task = get_task(name)
        with tempfile.TemporaryDirectory() as scratch:
            evaluate_composed(composed, shared, task, task_rows, validation_config(task, sweep["dtype"]),
                              {"label": label}, out_dir=scratch, progress=False)
            values[name] = metric_value(task, metrics.read_predictions(scratch))
    return values


def validation_identity(sweep_dir: str | Path) -> str:
    """What a model's validation scores depend on besides the model: the sweep's rows and the
    precision they are scored in. Sweeps of one run share it, so each model is scored once."""
    sweep_dir = Path(sweep_dir)
    return stable_hash({"rows": io.read_json(sweep_dir / VALIDATION_FILE), "dtype": read_sweep(sweep_dir)["dtype"]})


def place(composed: Composed, shared, sweep_dir: str | Path, label: str, values: dict[str, float] | None = None,
          fitted: dict[str, list[dict]] | None = None) -> dict:
    """A model's validation metrics on the sweep's rows (score_composed, unless `values` already
    holds them for the same validation_identity), its objective and its rank in the grid.
    `fitted`: the validation rows the model was trained or searched on, by task; how many of the
    sweep's rows are among them is recorded, since there its placement is in-sample."""
    sweep = read_sweep(sweep_dir)
    values = score_composed(composed, shared, sweep_dir, label) if values is None else values
    rank = grid_rank(sweep, values)
    value = objective(values, sweep["references"], sweep["tasks_in_objective"], sweep["selection"])
    return {"label": label, "metrics": values, "objective": finite_or_none(value), "grid_rank": rank,
            "within_best_share": rank <= BEST_SHARE,
            "fitted_on_rows": rows_fitted_on(io.read_json(Path(sweep_dir) / VALIDATION_FILE), fitted or {})}


def rows_fitted_on(sweep_rows: dict[str, list[dict]], fitted: dict[str, list[dict]]) -> dict[str, dict[str, int]]:
    """Per task, how many of a sweep's validation rows are among the `fitted` rows, of how many."""
    counts = {}
    for task, task_rows in sweep_rows.items():
        used = {row_key(row) for row in fitted.get(task, [])}
        counts[task] = {"fitted": sum(row_key(row) in used for row in task_rows), "rows": len(task_rows)}
    return counts


def fitted_note(placement: dict) -> str:
    """'' for a placement on rows the model never fitted, else what its legend entry adds."""
    shares = [f"{c['fitted']}/{c['rows']} {task}" for task, c in placement.get("fitted_on_rows", {}).items()
              if c["fitted"]]
    return f" (fitted on {', '.join(shares)} rows)" if shares else ""


def write_placements(sweep_dir: str | Path, placements: list[dict]) -> Path:
    """placed.json (every placement, in the order given) and pareto_all.png (the sweep's plot with
    every placed model marked), rewritten only when the placements changed."""
    sweep_dir = Path(sweep_dir)
    summary = {"selection": read_sweep(sweep_dir)["selection"], "best_share": BEST_SHARE, "placed": placements}
    unchanged = (sweep_dir / PLOT_ALL_FILE).is_file() and (sweep_dir / PLACED_FILE).is_file() \
        and io.read_json(sweep_dir / PLACED_FILE) == summary
    if not unchanged:
        plot_pareto(sweep_dir, sweep_dir / PLOT_ALL_FILE,
                    others={p["label"] + fitted_note(p): p["metrics"] for p in placements})
        io.write_json(sweep_dir / PLACED_FILE, summary)
    return sweep_dir / PLACED_FILE


class FoldedWeights:
    """The adapted modules of a borrowed base, set to W₀ + ΔW for one update after another.

    ΔW is computed as PEFT's LoRA merge computes it (transpose(B @ A) · scaling in float32, added
    in place), so an update scores here as the adapter saved from it scores when
    SharedBase.with_adapter folds it in. Only the adapted modules' weights are copied."""

    def __init__(self, model, modules: list[str]):
        from transformers.pytorch_utils import Conv1D

        self.layers = {name: model.get_submodule(name) for name in modules}
        self.original = {name: layer.weight.detach().clone() for name, layer in self.layers.items()}
        self.transposed = {name: isinstance(layer, Conv1D) for name, layer in self.layers.items()}

    @torch.no_grad()
    def fold(self, factors: dict[str, LoraFactors]) -> None:
        """Every adapted module back to W₀, plus its ΔW where `factors` has one."""
        for name, layer in self.layers.items():
            layer.weight.copy_(self.original[name])
            if name in factors:
                f = factors[name]
                device = layer.weight.device
                delta = f.lora_B.to(device, torch.float32) @ f.lora_A.to(device, torch.float32)
                layer.weight.data += (delta.T if self.transposed[name] else delta) * f.scale


def merged_factors(method: str, modules: dict[str, list[LoraFactors | None]], point: dict) -> dict[str, LoraFactors]:
    """A grid point's merge, as adapters.write_factors saves it (scale folded into B, PEFT scaling 1)."""
    from ..merging import merge_modules

    merged, _ = merge_modules(method, modules, point["weights"], point["params"])
    return {name: f.folded() for name, f in merged.items()}


# ---------------------------------------------------------------- the composition

class WeightSweep(Composition):
    name = "weight_sweep"
    paper = ("validation grid search as in Ilharco et al. 2023 (arXiv:2212.04089) and Yadav et al. 2023 "
             "(arXiv:2306.01708); weight-sweep Pareto view as in FusionBench (Tang et al. 2024, arXiv:2406.03280)")

    def __init__(self, **params):
        from ..merging import get_method

        if "method" not in params:
            raise WeightSweepError(f"composition 'weight_sweep' needs `method`, the merge to sweep; methods with a "
                                   f"default grid: {', '.join(DEFAULT_GRIDS)}")
        try:
            spec = get_method(params["method"])
        except ValueError as err:
            raise WeightSweepError(f"composition 'weight_sweep': {err}") from None
        merge_params = [p.name for p in spec.params]
        valid = ["method", "selection", "n_validation", *WEIGHT_AXES, *merge_params]
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise WeightSweepError(f"composition 'weight_sweep': unknown parameter(s) {unknown} for method "
                                   f"{spec.name!r}; valid: {valid}")
        axes = {name: value for name, value in params.items() if name in (*WEIGHT_AXES, *merge_params)
                and (name in WEIGHT_AXES or isinstance(value, (list, tuple)))}
        fixed = {name: value for name, value in params.items() if name in merge_params and name not in axes}
        if not axes:
            if spec.name not in DEFAULT_GRIDS:
                raise WeightSweepError(f"composition 'weight_sweep': no default grid for merge method {spec.name!r} "
                                       f"(defaults exist for {', '.join(DEFAULT_GRIDS)}); give at least one axis "
                                       f"as a list: {', '.join([*WEIGHT_AXES, *merge_params])}")
            axes = {name: values for name, values in DEFAULT_GRIDS[spec.name].items() if name not in fixed}
        self.params = {"method": spec.name, "axes": check_axes(spec, axes), "fixed": checked_fixed(spec, fixed),
                       "selection": params.get("selection", "mean_retention"),
                       "n_validation": params.get("n_validation")}
        problem = setting_problem(self.params)
        if problem:
            raise WeightSweepError(f"composition 'weight_sweep': {problem}")

    def needs(self) -> Needs:
        if self.params["n_validation"]:
            return Needs(validation_per_task=self.params["n_validation"], base_forward=True)
        # The run draws the most any kind takes; the sweep scores fewer of them for some kinds.
        fewer = ", ".join(f"{n} for {kind.replace('_', '-')} tasks" for kind, n in DEFAULT_N_VALIDATION.items()
                          if n < max(DEFAULT_N_VALIDATION.values()))
        return Needs(validation_per_task=max(DEFAULT_N_VALIDATION.values()), validation_note=f" ({fewer})",
                     base_forward=True)

    def load(self, out_dir: Path) -> Composed:
        return OneModel(out_dir / ADAPTER_DIR)

    def build(self, inputs: BuildInputs, out_dir: Path) -> dict:
        started = time.time()
        tasks = list(inputs.experts)
        if len(tasks) < 2:
            raise WeightSweepError(f"weight_sweep composes at least 2 experts, got {len(tasks)} ({', '.join(tasks)})")
        points = grid_points(self.params["axes"], self.params["fixed"], len(tasks))
        rows = self.validation_rows(inputs)
        experts = [adapters.read_adapter(path) for path in inputs.experts.values()]
        adapters.check_same_base(experts)
        modules = {name: [e.factors.get(name) for e in experts]
                   for name in sorted(set().union(*(e.factors for e in experts)))}
        merge = partial(merged_factors, self.params["method"], modules)
        merge(points[0])  # experts the method cannot merge fail here, before the base is borrowed
        if inputs.borrow_base is None:
            raise WeightSweepError("weight_sweep runs the base model: BuildInputs.borrow_base is None")
        with inputs.borrow_base() as loaded:
            folded = FoldedWeights(loaded.model.eval(), sorted(modules))
            point_metrics, references, sources, timing = self.score_grid(
                loaded, folded, points, merge, rows, dict(zip(tasks, experts)), inputs)
        in_objective = tasks_with_retention(references, tasks)
        if not in_objective:
            raise WeightSweepError(f"weight_sweep: no expert improves its task's validation "
                                   f"{', '.join(get_task(t).retention_metric for t in tasks)} on the base on "
                                   f"{', '.join(f'{len(rows[t])} {t}' for t in tasks)} rows, so no point has a "
                                   f"retention to choose by; raise n_validation")
        chosen, scores = choose(point_metrics, references, in_objective, self.params["selection"])
        sweep = self.summary(tasks, points, point_metrics, scores, references, sources, in_objective, chosen,
                             rows, inputs)
        best = points[chosen]
        adapters.merge_adapter_dirs(list(inputs.experts.values()), self.params["method"], out_dir / ADAPTER_DIR,
                                    best["weights"], best["params"],
                                    extra_metadata={"weight_sweep": {"point": chosen, **best}})
        # sweep.json decides the placements' cache keys, so it holds what the sweep found and no
        # timings, which differ in every rebuild; those go to composition.json's metadata.
        sweep["cost"] = {"points": len(points),
                         "references_scored": sum(s == DIRECT for s in sources.values()),
                         "validation_examples": {t: len(rows[t]) for t in tasks}}
        io.write_json(out_dir / SWEEP_FILE, sweep)
        io.write_json(out_dir / VALIDATION_FILE, rows)
        plot_pareto(sweep, out_dir / PLOT_FILE)
        return {"kind": "weight_sweep", "method": self.params["method"], "chosen": sweep["points"][chosen],
                "tasks_in_objective": in_objective, **sweep["cost"],
                **{k: round(v, 2) for k, v in timing.items()}, "seconds": round(time.time() - started, 2)}

    def score_grid(self, loaded, folded: FoldedWeights, points: list[dict], merge, rows: dict[str, list[dict]],
                   experts: dict[str, adapters.Adapter], inputs: BuildInputs):
        """Every point's validation metrics on the borrowed base, then the base's and experts' (the
        grid points that are them, else scored now), their sources, and the seconds spent."""
        timing = {"merge_s": 0.0, "score_s": 0.0}

        def score(factors: dict[str, LoraFactors]) -> dict[str, float]:
            folded.fold(factors)
            started = time.time()
            values = score_model(loaded.model, loaded.tokenizer, rows, inputs.dtype)
            timing["score_s"] += time.time() - started
            return values

        point_metrics = []
        for point in progress_over(points, inputs.progress):
            started = time.time()
            merged = merge(point)
            timing["merge_s"] += time.time() - started
            point_metrics.append(score(merged))
        roles = [reference_role(self.params["method"], p) for p in points]

        def reference(role, factors) -> tuple[dict[str, float], str]:
            if role in roles:
                return point_metrics[roles.index(role)], f"grid point {roles.index(role)}"
            return score(factors), DIRECT

        base, base_source = reference("base", {})
        measured = {task: reference(i, expert.factors) for i, (task, expert) in enumerate(experts.items())}
        folded.fold({})
        references = {"base": base, "experts": {task: m for task, (m, _) in measured.items()}}
        sources = {"base": base_source, **{task: source for task, (_, source) in measured.items()}}
        return point_metrics, references, sources, timing

    def validation_rows(self, inputs: BuildInputs) -> dict[str, list[dict]]:
        missing = [task for task in inputs.experts if not inputs.validation.get(task)]
        if missing:
            raise WeightSweepError(f"weight_sweep needs validation rows of every task; none for {', '.join(missing)} "
                                   f"(given for: {', '.join(sorted(inputs.validation)) or 'no task'})")
        return {task: inputs.validation[task][: self.rows_for(get_task(task))] for task in inputs.experts}

    def rows_for(self, task: Task) -> int:
        return self.params["n_validation"] or DEFAULT_N_VALIDATION.get(task.kind, max(DEFAULT_N_VALIDATION.values()))

    def summary(self, tasks, points, point_metrics, scores, references, sources, in_objective, chosen, rows,
                inputs) -> dict:
        """sweep.json: every point with its metrics, retentions, objective and Pareto membership."""
        described = {t: described_metric(get_task(t)) for t in tasks}
        front = set(pareto_front([[m[t] for t in tasks] for m in point_metrics],
                                 [described[t]["higher_is_better"] for t in tasks]))
        base, experts = references["base"], references["experts"]
        return {
            "composition": self.name, "params": self.params, "method": self.params["method"], "tasks": tasks,
            "metrics": described, "selection": self.params["selection"], "tasks_in_objective": in_objective,
            "n_validation": {t: len(rows[t]) for t in tasks}, "dtype": inputs.dtype, "seed": inputs.seed,
            "references": {"base": base, "experts": experts, "sources": sources},
            "chosen": chosen,
            "points": [{"index": i, "weights": p["weights"], "params": p["params"], "metrics": m,
                        "retention": {t: finite_or_none(task_retention(t, m[t], references)) for t in tasks},
                        "objective": finite_or_none(score), "pareto": i in front, "chosen": i == chosen}
                       for i, (p, m, score) in enumerate(zip(points, point_metrics, scores))],
        }


def described_metric(task: Task) -> dict:
    metric = task.report_metric(task.retention_metric)
    return {"name": metric.name, "title": metric.title, "higher_is_better": metric.higher_is_better}


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def progress_over(points: list, shown: bool):
    from tqdm.auto import tqdm

    return tqdm(points, desc="weight sweep", disable=not shown)


def check_axes(spec, axes: dict) -> dict:
    """The axes as lists of checked values; one error naming the axis and the valid values."""
    from ..merging import parse_params

    if "weights" in axes and "scale" in axes:
        raise WeightSweepError("composition 'weight_sweep': give `weights` (one value per expert) or `scale` "
                               "(one weight for all experts), not both")
    checked = {}
    for name, values in axes.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise WeightSweepError(f"composition 'weight_sweep': grid axis {name!r} is empty or not a list, got "
                                   f"{values!r}; give a non-empty list of values")
        if name == "weights" and all(isinstance(v, (list, tuple)) for v in values):
            for per_expert in values:
                check_axes(spec, {"weights": per_expert})
            checked[name] = [list(v) for v in values]
            continue
        if name in WEIGHT_AXES:
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                raise WeightSweepError(f"composition 'weight_sweep': grid axis {name!r} needs finite numbers, "
                                       f"got {values!r}")
            checked[name] = [float(v) for v in values]
            continue
        try:
            checked[name] = [parse_params(spec, {name: v})[name] for v in values]
        except ValueError as err:
            raise WeightSweepError(f"composition 'weight_sweep': grid axis {name!r}: {err}") from None
    return checked


def checked_fixed(spec, fixed: dict) -> dict:
    """The merge parameters that are not swept, typed as the merge reads them."""
    from ..merging import parse_params

    try:
        parsed = parse_params(spec, fixed)
    except ValueError as err:
        raise WeightSweepError(f"composition 'weight_sweep': {err}") from None
    return {name: parsed[name] for name in fixed}


def setting_problem(params: dict) -> str | None:
    if params["selection"] not in SELECTION_RULES:
        return f"unknown selection {params['selection']!r}; valid: {', '.join(SELECTION_RULES)}"
    n = params["n_validation"]
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        return f"n_validation must be an integer >= 1 (or absent: {DEFAULT_N_VALIDATION} by task kind), got {n!r}"
    return None


# ---------------------------------------------------------------- the plot

def plot_pareto(sweep: dict | str | Path, path: str | Path, others: dict[str, dict[str, float]] | None = None) -> Path:
    """The first two tasks' validation metrics of every grid point, the Pareto front of those two,
    base and experts, the chosen point, and `others`: label -> validation metrics of any other
    model scored on the same rows (score_composed), e.g. routers, LoraHub, the multitask adapter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = read_sweep(sweep)
    x_task, y_task = sweep["tasks"][:2]
    coords = lambda m: (m[x_task], m[y_task])  # noqa: E731
    points = sweep["points"]
    xs, ys = zip(*(coords(p["metrics"]) for p in points))
    # With other models marked the legend is long: beside the axes, not over the points.
    fig, ax = plt.subplots(figsize=(9.5 if others else 7.0, 5.2))
    ax.scatter(xs, ys, s=18, color="#9a9a9a", label=f"grid ({len(points)} points)", zorder=2)
    directions = [sweep["metrics"][t]["higher_is_better"] for t in (x_task, y_task)]
    front = sorted(pareto_front(list(zip(xs, ys)), directions), key=lambda i: xs[i])
    ax.plot([xs[i] for i in front], [ys[i] for i in front], color="#1f77b4", linewidth=1.5, marker="o",
            markersize=4, label="Pareto front (these two metrics)", zorder=3)
    for i in front:
        ax.annotate(point_label(points[i]), (xs[i], ys[i]), xytext=(4, 4), textcoords="offset points", fontsize=6)
    chosen = points[sweep["chosen"]]
    ax.scatter(*coords(chosen["metrics"]), s=160, marker="*", color="#d62728", zorder=5,
               label=f"chosen: {point_label(chosen)} ({sweep['selection']})")
    marked = {"base": sweep["references"]["base"],
              **{f"{t} expert": m for t, m in sweep["references"]["experts"].items()}, **(others or {})}
    markers = itertools.cycle(["s", "^", "v", "D", "P", "X", "<", ">", "h"])
    for label, values in marked.items():
        ax.scatter(*coords(values), s=55, marker=next(markers), edgecolor="black", linewidth=0.6, zorder=4,
                   label=label)
    for task, axis in ((x_task, ax.set_xlabel), (y_task, ax.set_ylabel)):
        metric = sweep["metrics"][task]
        better = "higher" if metric["higher_is_better"] else "lower"
        axis(f"{task} validation {metric['name']} ({better} is better, n = {sweep['n_validation'][task]})")
    ax.set_title(f"{sweep['method']} weight sweep on validation data")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if others else {"loc": "best"}))
    fig.tight_layout()
    with io.atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def point_label(point: dict) -> str:
    weights = ", ".join(f"{w:g}" for w in point["weights"])
    params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point["params"].items())
    return f"w=({weights})" + (f", {params}" if params else "")
