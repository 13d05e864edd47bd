"""Run an experiment as cached, resumable cells: train -> compose -> place -> evaluate -> report
(place: every other composed model scored on each weight sweep's validation rows).

Every piece of work is a `Cell`: a key that hashes everything it depends on (settings, inputs,
the task's prompt and scoring code, package and library versions), a folder, and the function
that fills it. The function writes atomically; the cell then records a manifest of every file's
size and hash. A rerun skips cells whose key matches and whose files are intact and recomputes
the rest, so an interrupted run resumes where it stopped, a damaged file is recomputed, and a
changed setting recomputes only what it affects.

A model under evaluation is a composition (compose/): the base alone, an expert, a static merge,
a router, a weight search. All of them are scored on one base model per process
(adapters.SharedBase), with each adapter folded in and removed in turn.
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from . import adapters, cache, io, metrics, training
from .compose import BuildInputs, Composed, Composition, OneModel, get_composition, weight_sweep
from .compose.static_merge import StaticMerge
from .config import ExperimentConfig, stable_hash
from .data import data_source, load_sample, resolve_data_dir, validation_sample
from .evaluation import EvalConfig, evaluate_composed
from .executors import SerialExecutor
from .models import check_device, check_target_modules, load_model, pick_device
from .tasks import get_task

COMPOSITION_FILE = "composition.json"
# How a model is scored, beyond the evaluation settings: part of every evaluation key, so a
# change in how adapters are applied recomputes every score. "folded": W + scale·B·A.
SCORING = "folded/1"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cell_key(parts: dict, task: str | None = None, libraries: tuple[str, ...] = cache.MODEL_LIBRARIES) -> str:
    """A cell's cache key: its own inputs and settings, the task's prompt and scoring version
    (see Task.fingerprint) and the versions of the code that computes it."""
    extra = {"task_version": get_task(task).fingerprint()} if task else {}
    reserved = set(parts) & {"task_version", "code"}
    if reserved:  # they would be overwritten below, silently leaving the part out of the key
        raise ValueError(f"cell key part(s) {sorted(reserved)} are reserved")
    return stable_hash({**parts, **extra, "code": cache.code_versions(libraries)})


def reusable(folder: Path, key: str, what: str) -> bool:
    """Whether a finished cell can be reused; says why not when its recorded files were damaged."""
    reason = cache.stale_reason(folder, key)
    if reason is None:
        log(f"{what}: cached")
    elif reason not in cache.ORDINARY_REASONS:
        log(f"{what}: {reason}; recomputing")
    return reason is None


@dataclass
class Cell:
    """One unit of work. `compute` fills `folder` (atomically); the manifest is written last."""

    what: str
    folder: Path
    key: str
    compute: Callable[[], object]
    gpu: bool = False  # runs the base model: an executor with GPUs gives it one

    def ensure(self) -> bool:
        """Compute unless the cached result is intact; True when it was computed now."""
        if reusable(self.folder, self.key, self.what):
            return False
        started = time.time()
        log(f"{self.what}: computing")
        self.compute()
        cache.record_outputs(self.folder, self.key)
        log(f"{self.what}: done in {time.time() - started:.0f} s")
        return True

    def output_key(self, artefacts: tuple[str, ...] = ()) -> str:
        """The cell's key and the hashes of the files that decide the model it produced (weights,
        adapter configs, and the named `artefacts`, e.g. a router's routes): downstream cells key
        on the actual outputs, so an input rebuilt to other weights invalidates everything built
        on it, while one rebuilt to the same weights (a deterministic rerun, whose logs and
        timings differ) invalidates nothing."""
        files = io.read_json(self.folder / cache.MANIFEST)["files"]
        deciding = {name: self._adapter_config_digest(name) if Path(name).name == adapters.CONFIG_FILE else digest
                    for name, digest in files.items()
                    if name.endswith(".safetensors") or Path(name).name in (adapters.CONFIG_FILE, *artefacts)}
        return stable_hash({"cell": self.key, "files": deciding})

    def _adapter_config_digest(self, name: str) -> str:
        """An adapter config's content but for where the base model was on the machine that made it
        (an absolute cache path): the cell's key holds the base's fingerprint already."""
        config = io.read_json(self.folder / name)
        config.pop("base_model_name_or_path", None)
        return stable_hash(config)


# The process's loaded base models, by (model, device, trust_remote_code): one load per process.
_SHARED_BASES: dict[tuple, adapters.SharedBase] = {}


@dataclass
class ModelEntry:
    """A model the run evaluates: how to load it for scoring, and how the table names it."""

    slug: str  # folder name under eval/
    label: str  # what the table calls it (the same for every seed)
    kind: str  # base | expert | merge | composition
    key: str
    load: Callable[[], Composed]
    seed: int | None = None  # the training seed of the experts it comes from; None for the base
    relative_error: float | None = None  # a compressed merge's error against its exact update
    needs: str = "weights only"
    adapter: Path | None = None  # experts: the trained adapter folder
    extra: dict = field(default_factory=dict)

    def info(self) -> dict:
        info = {"label": self.label, "kind": self.kind, "slug": self.slug, "seed": self.seed,
                "adapter": str(self.adapter) if self.adapter else None, "needs": self.needs, **self.extra}
        if self.relative_error is not None:
            info["relative_error"] = self.relative_error
        return info


def check_remote_code(config: ExperimentConfig, allowed: bool) -> None:
    """A config's trust_remote_code runs only with the command line's consent (--trust-remote-code),
    for every command that loads the config's model: a config file may come from anyone."""
    if config.trust_remote_code and not allowed:
        raise ValueError("trust_remote_code: true in the config runs code from the model's repository; "
                         "add --trust-remote-code to the command line to allow it")


class Experiment:
    def __init__(self, config: ExperimentConfig, out_dir: str | Path, progress: bool = True, executor=None):
        self.config = config
        self.out = Path(out_dir)
        self.progress = progress
        self.executor = executor or SerialExecutor()
        self.data_dir = resolve_data_dir(config.data_dir)
        self.data_source = data_source(config.data_dir)
        self.current_results: list[Path] = []  # the eval folders this run's report shows
        self._rows: dict[tuple, list[dict]] = {}
        # (model key, validation_identity) -> validation metrics: sweeps on the same rows place
        # each model after one scoring (in this process; other workers score it again).
        self._validation_scores: dict[tuple, dict[str, float]] = {}
        self._token = uuid.uuid4().hex  # names this run's copies in other processes

    def __reduce__(self):
        """Cells travel to other processes (executors) without this process's model; every cell
        carries its own copy, and the copies of one run that reach a process become one
        Experiment there, so that a worker loads the base once for all the cells it runs."""
        return _arrived_experiment, ({**self.__dict__, "executor": None},)

    # ------------------------------------------------------------ data and base model

    @property
    def precision(self) -> str:
        """The precision the config's dtype means on the config's device ("auto": bf16 on CUDA,
        fp32 on CPU), for cache keys: the same config gives other numbers on another device."""
        from .models import dtype_name, resolve_dtype

        return dtype_name(resolve_dtype(self.config.dtype, pick_device(self.config.device), "dtype"))

    def base(self):
        """A fresh base model, for callers outside the run (the sweeps)."""
        return load_model(self.config.model, trust_remote_code=self.config.trust_remote_code)

    @property
    def shared(self) -> adapters.SharedBase:
        """This process's one base model, loaded on first use and kept for every later cell in
        the process (an executor's worker runs many cells, each with its own copy of the run)."""
        key = (self.config.model, self.config.device, self.config.trust_remote_code)
        if key not in _SHARED_BASES:
            _SHARED_BASES[key] = adapters.SharedBase(self.base(), pick_device(self.config.device))
        return _SHARED_BASES[key]

    def train_rows(self, task: str) -> list[dict]:
        return self._cached_rows(("train", task), lambda: load_sample(
            task, "train", self.config.n_train[task], self.config.data_seed, self.data_dir, what=f"n_train.{task}"))

    def eval_rows(self, task: str) -> list[dict]:
        settings = self.config.eval
        return self._cached_rows(("eval", task), lambda: load_sample(
            task, settings.split, settings.n_eval[task], settings.seed, self.data_dir, what=f"eval.n_eval.{task}"))

    def validation_rows(self, task: str, n: int, what: str = "the validation sample size") -> list[dict]:
        """Labelled rows for compositions that learn or search: never test rows (data.validation_sample).
        `what` names the setting that asked for n, for the error when the split has fewer."""
        return self._cached_rows(("validation", task, n), lambda: validation_sample(
            task, n, self.config.eval.seed, self.data_dir, self.train_rows(task), what))

    @staticmethod
    def rows_key(rows: list[dict]) -> str:
        """The rows a cell reads, by content: an edited mirror recomputes what read it, and the same
        rows at another path or from the hub reuse it (the path of the data is in no key)."""
        return stable_hash(rows)

    def _cached_rows(self, key: tuple, load: Callable[[], list[dict]]) -> list[dict]:
        if key not in self._rows:
            self._rows[key] = load()
        return self._rows[key]

    def preflight(self, trust_remote_code: bool = False) -> None:
        """Every check of the user's input that can fail, before anything is written."""
        check_remote_code(self.config, trust_remote_code)
        check_device(self.config.device, "config key device")
        for task in self.config.tasks:
            self.train_rows(task)
            self.eval_rows(task)
        for name, composition in self.compositions()[len(self.config.merges):]:
            n = composition.needs().validation_per_task
            for task in self.config.tasks if n else ():
                self.validation_rows(task, n, what=f"n_validation of composition {name}")
        for task in self.config.tasks:
            where = f"train_per_task.{task}.target_modules" if "target_modules" in \
                self.config.train_per_task.get(task, {}) else "train.target_modules"
            check_target_modules(self.shared.loaded.model,
                                 self.config.train_settings(task, self.config.seeds[0]).target_modules, where)

    # ------------------------------------------------------------ cells

    def train_cell(self, task: str, fingerprint: dict, seed: int) -> Cell:
        settings = self.config.train_settings(task, seed)
        # Resolved here, where the key is made, and passed to the worker as is: "auto" on a worker
        # with a GPU would train in bf16 under a key that a CPU-only driver made for fp32.
        precision = self.precision
        key = cell_key({"base": fingerprint, "task": task, "rows": self.rows_key(self.train_rows(task)),
                        "train": settings.result_settings(), "precision": precision,
                        "target_loss": training.TARGET_LOSS_VERSION}, task)
        folder = self.out / "adapters" / f"seed{seed}" / task

        def compute():
            log(f"train {task}: {self.config.n_train[task]} examples, {settings.epochs} epoch(s)")
            with self.shared.borrowed() as loaded:
                meta = training.train_adapter(loaded, get_task(task), self.train_rows(task), settings, folder,
                                     self.config.device, progress=self.progress,
                                     extra_metadata={"cell_key": key, "data": self.data_source},
                                     dtype=precision)
            log(f"train {task}: final loss {meta['final_loss']:.3f}")

        return Cell(f"train {task} (seed {seed})", folder, key, compute, gpu=True)

    def expert_entry(self, task: str, cell: Cell, seed: int) -> ModelEntry:
        return ModelEntry(f"expert_{task}_seed{seed}", f"{task} expert", "expert", cell.output_key(),
                          lambda: OneModel(cell.folder), seed, adapter=cell.folder, extra={"task": task})

    def composition_cell(self, name: str, composition: Composition, experts: dict[str, ModelEntry],
                         fingerprint: dict, seed: int) -> Cell:
        needs = composition.needs()
        precision = self.precision  # as in train_cell: the key's precision is the one the worker runs
        uses = {"composition": composition.key(), "sources": [e.key for e in experts.values()]}
        if needs.validation_per_task:
            uses["validation"] = {t: self.rows_key(self.validation_rows(t, needs.validation_per_task))
                                  for t in self.config.tasks}
        if needs.router_training or needs.training_data or needs.gradients:
            uses["train_data"] = {t: self.rows_key(self.train_rows(t)) for t in self.config.tasks}
        if needs.base_forward or needs.gradients:
            uses["base"] = fingerprint
            uses["precision"] = precision
        static = isinstance(composition, StaticMerge)
        key = cell_key({**uses, "seed": seed}, libraries=cache.COMPOSITION_LIBRARIES + composition.libraries)
        folder = self.out / ("merges" if static else "compositions") / f"seed{seed}" / name
        scratch = folder.parent / f"{folder.name}.scratch"

        def compute():
            inputs = BuildInputs(
                experts={task: e.adapter for task, e in experts.items()}, seed=seed,
                borrow_base=self.shared.borrowed if (needs.base_forward or needs.gradients) else None,
                validation={t: self.validation_rows(t, needs.validation_per_task) for t in experts}
                if needs.validation_per_task else {},
                train_rows={t: self.train_rows(t) for t in experts}
                if (needs.router_training or needs.training_data or needs.gradients) else {},
                train_settings={t: self.config.train_settings(t, seed) for t in experts},
                device=self.config.device, dtype=precision, scratch=scratch, progress=self.progress)
            started = time.time()
            with io.atomic_dir(folder) as staging:
                metadata = composition.build(inputs, staging)
                io.write_json(staging / COMPOSITION_FILE, {
                    "composition": composition.name, "paper": composition.paper, "key": composition.key(),
                    "needs": asdict(needs), "needs_summary": needs.summary(), "cell_key": key, "seed": seed,
                    "build_s": round(time.time() - started, 2), "metadata": metadata})
            shutil.rmtree(scratch, ignore_errors=True)

        return Cell(f"{'merge' if static else 'compose'} {name} (seed {seed})", folder, key, compute,
                    gpu=needs.base_forward or needs.gradients)

    def composition_entry(self, name: str, composition: Composition, cell: Cell, seed: int) -> ModelEntry:
        recorded = io.read_json(cell.folder / COMPOSITION_FILE)
        static = isinstance(composition, StaticMerge)
        error = ((recorded.get("metadata") or {}).get("info") or {}).get("max_relative_error")
        kind = "merge" if static else "composition"
        return ModelEntry(f"{'merge' if static else 'compose'}_{name}_seed{seed}", metrics.model_label(name, kind),
                          kind, cell.output_key(composition.artefacts), lambda: composition.load(cell.folder), seed,
                          error or None,
                          # What the composition declares now: a label corrected in the code
                          # reaches cells built before, whose keys it does not change.
                          composition.needs().summary())

    def place_cell(self, sweep: Cell, sweep_composition: Composition, name: str, entry: ModelEntry,
                   fingerprint: dict, seed: int, placed: Composition) -> Cell:
        """One composed model scored on a weight sweep's validation rows and ranked in its grid, so
        that routers, LoraHub, LoRA Soups and the merges are placed on the sweep's plot (issue 8).
        A model trained or searched on validation rows may have seen some of the sweep's: the
        placement records how many (weight_sweep.rows_fitted_on)."""
        deciding = (*sweep_composition.artefacts, weight_sweep.SWEEP_FILE, weight_sweep.VALIDATION_FILE)
        n_fitted = placed.needs().validation_per_task
        key = cell_key({"sweep": sweep.output_key(deciding), "model": entry.key, "base": fingerprint,
                        "precision": self.precision, "scoring": SCORING, "fitted_validation": n_fitted,
                        "task_versions": {task: get_task(task).fingerprint() for task in self.config.tasks}})
        folder = sweep.folder / weight_sweep.PLACED_DIR / name

        def compute():
            scored = (entry.key, weight_sweep.validation_identity(sweep.folder))
            fitted = {task: self.validation_rows(task, n_fitted) for task in self.config.tasks} if n_fitted else {}
            placement = weight_sweep.place(entry.load(), self.shared, sweep.folder, entry.label,
                                           self._validation_scores.get(scored), fitted)
            self._validation_scores[scored] = placement["metrics"]
            io.write_json(folder / weight_sweep.PLACEMENT_FILE, {**placement, "kind": entry.kind, "cell_key": key})
            log(f"place {name} in {sweep.folder.name}: grid rank {placement['grid_rank']:.2f}")

        return Cell(f"place {name} in {sweep.folder.name} (seed {seed})", folder, key, compute, gpu=True)

    def placements(self, built: list[tuple[str, Composition, Cell]], entries: dict[str, ModelEntry],
                   fingerprint: dict, seed: int) -> dict[Path, list[Cell]]:
        """For each weight sweep of the seed, a placement cell per other composed model (the
        experts and the base are the sweep's own references already)."""
        sweeps = [(composition, cell) for _, composition, cell in built
                  if isinstance(composition, weight_sweep.WeightSweep)]
        others = [(name, composition) for name, composition, _ in built
                  if not isinstance(composition, weight_sweep.WeightSweep)]
        if not others:
            return {}
        return {cell.folder: [self.place_cell(cell, composition, name, entries[name], fingerprint, seed, placed)
                              for name, placed in others] for composition, cell in sweeps}

    @staticmethod
    def summarise_placements(placements: dict[Path, list[Cell]]) -> None:
        """Each sweep's placed.json and pareto_all.png, from its placement cells' files."""
        for sweep_folder, cells in placements.items():
            placed = weight_sweep.write_placements(
                sweep_folder, [io.read_json(cell.folder / weight_sweep.PLACEMENT_FILE) for cell in cells])
            log(f"placed {len(cells)} model(s) in the {sweep_folder.name} grid: {placed} and "
                f"{sweep_folder / weight_sweep.PLOT_ALL_FILE}")

    def eval_config(self, task: str) -> EvalConfig:
        settings, n_eval = self.config.eval, self.config.eval.n_eval[task]
        # Recorded as what was generated: never more than the rows evaluated.
        n_generate = settings.n_generate if None in (n_eval, settings.n_generate) else min(settings.n_generate, n_eval)
        return EvalConfig(n_eval=n_eval, n_generate=n_generate,
                          max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                          generate_batch_size=settings.generate_batch_size, seed=settings.seed,
                          split=settings.split, dtype=self.precision)

    def eval_cell(self, entry: ModelEntry, task: str, fingerprint: dict) -> Cell:
        eval_config = self.eval_config(task)
        key = cell_key({"model": entry.key, "base": fingerprint, "task": task, "rows": self.rows_key(self.eval_rows(task)),
                        "eval": eval_config.__dict__, "scoring": SCORING}, task)
        folder = self.out / "eval" / entry.slug / task
        self.current_results.append(folder)

        def compute():
            info = {**entry.info(), "base_model": fingerprint, "cell_key": key}
            record = evaluate_composed(entry.load(), self.shared, get_task(task), self.eval_rows(task), eval_config,
                                       info, out_dir=folder, progress=self.progress)
            primary = record["metrics"][record["primary_metric"]]
            log(f"eval {entry.slug} on {task}: {record['primary_metric']} = {primary['value']:.3f}")

        return Cell(f"eval {entry.slug} on {task}", folder, key, compute, gpu=True)

    def baseline_cells(self) -> list[Cell]:
        from .baselines import baseline_names, baseline_record, code_fingerprint, evaluate_baselines

        cells = []
        for task in self.config.tasks:
            eval_config = self.eval_config(task)
            for name in baseline_names(task):
                # The classical models read the rows, the seed and nothing of the model's eval settings.
                key = cell_key({"baselines": task, "baseline": name, "seed": self.config.data_seed,
                                "train_rows": self.rows_key(self.train_rows(task)),
                                "eval_rows": self.rows_key(self.eval_rows(task)),
                                "split": eval_config.split, "sample_seed": eval_config.seed,
                                "baseline_code": code_fingerprint()},
                               task, cache.BASELINE_LIBRARIES)
                folder = self.out / "eval" / f"baseline_{name}" / task
                self.current_results.append(folder)

                def compute(task=task, name=name, key=key, folder=folder, eval_config=eval_config):
                    rows = self.eval_rows(task)
                    [(_, result, predictions)] = evaluate_baselines(task, self.train_rows(task), rows,
                                                                    seed=self.config.data_seed, only=name)
                    record = baseline_record(
                        get_task(task), {"label": f"baseline: {name}", "kind": "baseline",
                                         "slug": f"baseline_{name}", "cell_key": key},
                        result, split=eval_config.split, n=len(rows), seed=eval_config.seed,
                        config={"n_train": self.config.n_train[task], "data": self.data_source})
                    metrics.write_result(folder, record, predictions, rows)

                cells.append(Cell(f"baseline {name} on {task}", folder, key, compute))
        return cells

    # ------------------------------------------------------------ the whole run

    def compositions(self) -> list[tuple[str, Composition]]:
        """Every composed model of the config: static merges first, then the other compositions."""
        composed = [(spec.name, StaticMerge(spec.method, spec.weights, spec.params)) for spec in self.config.merges]
        return composed + [(spec.name, get_composition(spec.method, spec.params))
                           for spec in self.config.compositions]

    def run(self) -> Path:
        from .report import build_report, write_current_results

        self.out.mkdir(parents=True, exist_ok=True)
        io.write_json(self.out / "config.json", self.config.model_dump())
        started = time.time()
        fingerprint = self.shared.loaded.fingerprint
        models = [ModelEntry("base", "base", "base", stable_hash(fingerprint), lambda: OneModel(None))]
        stages: dict[str, float] = {}
        for seed in self.config.seeds:
            trained = {task: self.train_cell(task, fingerprint, seed) for task in self.config.tasks}
            stages["train"] = stages.get("train", 0) + self._timed(list(trained.values()))
            experts = {task: self.expert_entry(task, cell, seed) for task, cell in trained.items()}
            built = [(name, composition, self.composition_cell(name, composition, experts, fingerprint, seed))
                     for name, composition in self.compositions()]
            stages["compose"] = stages.get("compose", 0) + self._timed([cell for _, _, cell in built])
            composed = {name: self.composition_entry(name, composition, cell, seed)
                        for name, composition, cell in built}
            models += list(experts.values()) + list(composed.values())
            placements = self.placements(built, composed, fingerprint, seed)
            if placements:
                stages["place"] = stages.get("place", 0) + self._timed([c for cells in placements.values()
                                                                        for c in cells])
                self.summarise_placements(placements)
        stages["evaluate"] = self._timed([self.eval_cell(entry, task, fingerprint)
                                          for entry in models for task in self.config.tasks])
        if self.config.baselines:
            stages["baselines"] = self._timed(self.baseline_cells())
        write_current_results(self.out, self.current_results)
        report = build_report(self.out)
        log("stages: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in stages.items())
            + f"; total {time.time() - started:.0f} s")
        return report

    def _timed(self, cells: list[Cell]) -> float:
        started = time.time()
        self.executor.run(cells)
        return time.time() - started


# The Experiment that arrived in this process last (see Experiment.__reduce__): one run at a time.
_ARRIVED: dict[str, Experiment] = {}


def _arrived_experiment(state: dict) -> Experiment:
    held = _ARRIVED.get(state["_token"])
    if held is None:
        held = Experiment.__new__(Experiment)
        held.__dict__.update(state)
        _ARRIVED.clear()
        _ARRIVED[state["_token"]] = held
    return held


def run_experiment(config: ExperimentConfig, out_dir: str | Path, progress: bool = True,
                   trust_remote_code: bool = False, executor=None) -> Path:
    """Check every input, lock the run folder against a second run, clean what killed saves left
    behind, and run. trust_remote_code: the caller's explicit consent to a config that asks for it."""
    experiment = Experiment(config, out_dir, progress, executor)
    experiment.preflight(trust_remote_code)
    try:
        with io.exclusive_lock(out_dir):
            io.remove_leftovers_under(out_dir)
            return experiment.run()
    finally:
        experiment.executor.close()
