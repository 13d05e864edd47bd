"""Run an experiment as cached, resumable cells: train -> merge -> evaluate -> report.

Every cell writes its output atomically, then a manifest with a key that hashes everything it
depends on (settings, inputs, the task's prompt and scoring code, package and library versions)
and the size and hash of every file it wrote. A rerun skips cells whose key matches and whose
files are intact, and recomputes the rest, so an interrupted run resumes where it stopped, a
damaged file is recomputed, and a changed setting recomputes only what it affects.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from . import adapters, cache, io, metrics
from .config import ExperimentConfig, stable_hash
from .data import load_sample, resolve_data_dir
from .evaluation import EvalConfig, evaluate
from .models import check_device, load_model, pick_device
from .tasks import get_task
from .training import train_adapter


@dataclass
class ModelEntry:
    slug: str  # folder name under eval/
    label: str  # what the table calls it (the same for every seed)
    kind: str  # base | expert | merge
    adapter: Path | None
    key: str
    seed: int | None = None  # the training seed of the experts it comes from; None for the base
    relative_error: float | None = None  # a compressed merge's error against its exact update

    def info(self) -> dict:
        info = {"label": self.label, "kind": self.kind, "slug": self.slug, "seed": self.seed,
                "adapter": str(self.adapter) if self.adapter else None}
        if self.relative_error is not None:
            info["relative_error"] = self.relative_error
        return info


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cell_key(parts: dict, task: str | None = None, libraries: tuple[str, ...] = cache.MODEL_LIBRARIES) -> str:
    """A cell's cache key: its own inputs and settings, the task's prompt and scoring version
    (see Task.fingerprint) and the versions of the code that computes it."""
    extra = {"task_version": get_task(task).fingerprint()} if task else {}
    return stable_hash({**parts, **extra, "code": cache.code_versions(libraries)})


def reusable(folder: Path, key: str, what: str) -> bool:
    """Whether a finished cell can be reused; says why not when its recorded files were damaged."""
    reason = cache.stale_reason(folder, key)
    if reason is None:
        log(f"{what}: cached")
    elif reason not in cache.ORDINARY_REASONS:
        log(f"{what}: {reason}; recomputing")
    return reason is None


class Experiment:
    def __init__(self, config: ExperimentConfig, out_dir: str | Path, progress: bool = True):
        self.config = config
        self.out = Path(out_dir)
        self.progress = progress
        self.data_dir = resolve_data_dir(config.data_dir)
        self.data_source = str(self.data_dir.resolve()) if self.data_dir else "hub"
        self.current_results: list[Path] = []  # the eval folders this run's report shows

    # ------------------------------------------------------------ data and base model

    def base(self):
        """A fresh base model (training wraps the instance it is given, so each cell gets its own)."""
        return load_model(self.config.model, trust_remote_code=self.config.trust_remote_code)

    def train_rows(self, task: str) -> list[dict]:
        return load_sample(task, "train", self.config.n_train[task], self.config.data_seed, self.data_dir,
                           what=f"n_train.{task}")

    def eval_rows(self, task: str) -> list[dict]:
        settings = self.config.eval
        return load_sample(task, settings.split, settings.n_eval[task], settings.seed, self.data_dir,
                           what=f"eval.n_eval.{task}")

    def preflight(self, trust_remote_code: bool = False) -> None:
        """Every check of the user's input that can fail, before anything is written."""
        if self.config.trust_remote_code and not trust_remote_code:
            raise ValueError("trust_remote_code: true in the config runs code from the model's repository; "
                             "add --trust-remote-code to the command line to allow it")
        check_device(self.config.device, "config key device")
        for task in self.config.tasks:
            self.train_rows(task)
            self.eval_rows(task)
        self.base()

    # ------------------------------------------------------------ cells

    def train_cell(self, task: str, fingerprint: dict, seed: int) -> ModelEntry:
        settings = self.config.train_settings(task, seed)
        key = cell_key({"base": fingerprint, "task": task, "n": self.config.n_train[task],
                        "data_seed": self.config.data_seed, "data": self.data_source,
                        "train": settings.result_settings()}, task)
        folder = self.out / "adapters" / f"seed{seed}" / task
        if not reusable(folder, key, f"train {task} (seed {seed})"):
            log(f"train {task}: {self.config.n_train[task]} examples, {settings.epochs} epoch(s)")
            meta = train_adapter(self.base(), get_task(task), self.train_rows(task), settings, folder,
                                 self.config.device, progress=self.progress,
                                 extra_metadata={"cell_key": key, "data": self.data_source})
            cache.record_outputs(folder, key)
            log(f"train {task}: done in {meta['train_time_s']:.0f} s, final loss {meta['final_loss']:.3f}")
        return self._adapter_entry(f"expert_{task}_seed{seed}", f"{task} expert", "expert", folder, key, seed)

    def merge_cell(self, spec, experts: list[ModelEntry]) -> ModelEntry:
        seed = experts[0].seed
        key = cell_key({"merge": spec.model_dump(), "sources": [e.key for e in experts]})
        folder = self.out / "merges" / f"seed{seed}" / spec.name
        if not reusable(folder, key, f"merge {spec.name} (seed {seed})"):
            started = time.time()
            adapters.merge_adapter_dirs([e.adapter for e in experts], spec.method, folder, spec.weights,
                                        spec.params, extra_metadata={"cell_key": key, "label": spec.name})
            cache.record_outputs(folder, key)
            log(f"merge {spec.name}: done in {time.time() - started:.1f} s")
        return self._adapter_entry(f"merge_{spec.name}_seed{seed}", f"merge: {spec.name}", "merge", folder, key,
                                   seed)

    @staticmethod
    def _adapter_entry(slug: str, label: str, kind: str, folder: Path, cell_key: str, seed: int) -> ModelEntry:
        """Downstream cells key on the adapter's actual weights as well as on its settings, so a
        retrained or re-merged adapter invalidates every merge and evaluation built on it."""
        weights = hashlib.sha256((folder / adapters.WEIGHTS_FILE).read_bytes()).hexdigest()[:16]
        error = ((adapters.read_metadata(folder) or {}).get("info") or {}).get("max_relative_error")
        return ModelEntry(slug, label, kind, folder, stable_hash({"cell": cell_key, "weights": weights}), seed,
                          error or None)

    def eval_config(self, task: str) -> EvalConfig:
        settings = self.config.eval
        return EvalConfig(n_eval=settings.n_eval[task], n_generate=settings.n_generate,
                          max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                          generate_batch_size=settings.generate_batch_size, seed=settings.seed,
                          split=settings.split)

    def eval_cell(self, entry: ModelEntry, task: str, fingerprint: dict, rows_cache: dict) -> None:
        eval_config = self.eval_config(task)
        key = cell_key({"model": entry.key, "base": fingerprint, "task": task, "data": self.data_source,
                        "eval": eval_config.__dict__}, task)
        folder = self.out / "eval" / entry.slug / task
        self.current_results.append(folder)
        if reusable(folder, key, f"eval {entry.slug} on {task}"):
            return
        log(f"eval {entry.slug} on {task}")
        loaded = self.base()
        model = adapters.apply_adapter(loaded, entry.adapter) if entry.adapter else loaded.model
        if task not in rows_cache:
            rows_cache[task] = self.eval_rows(task)
        info = {**entry.info(), "base_model": fingerprint, "cell_key": key}
        model.to(pick_device(self.config.device))
        record = evaluate(model, loaded.tokenizer, get_task(task), rows_cache[task], eval_config, info,
                          out_dir=folder, progress=self.progress)
        cache.record_outputs(folder, key)
        primary = record["metrics"][record["primary_metric"]]
        log(f"eval {entry.slug} on {task}: {record['primary_metric']} = {primary['value']:.3f} "
            f"in {record['elapsed_s']:.0f} s")

    def baseline_cells(self, rows_cache: dict) -> None:
        from .baselines import evaluate_baselines

        for task in self.config.tasks:
            eval_config = self.eval_config(task)
            key = cell_key({"baselines": task, "data": self.data_source, "n_train": self.config.n_train[task],
                            "data_seed": self.config.data_seed, "eval": eval_config.__dict__},
                           task, cache.BASELINE_LIBRARIES)
            folders = self._baseline_folders(task)
            self.current_results += folders.values()
            if folders and all(cache.cached(f, key) for f in folders.values()):
                log(f"baselines on {task}: cached")
                continue
            if task not in rows_cache:
                rows_cache[task] = self.eval_rows(task)
            for name, result, predictions in evaluate_baselines(task, self.train_rows(task), rows_cache[task],
                                                                seed=self.config.data_seed):
                record = metrics.result_record(
                    task=task, split=eval_config.split, n=len(rows_cache[task]), seed=eval_config.seed,
                    model={"label": f"baseline: {name}", "kind": "baseline", "slug": f"baseline_{name}",
                           "cell_key": key},
                    metrics=result, primary_metric=get_task(task).primary_metric, chance=get_task(task).chance,
                    config={"n_train": self.config.n_train[task], "data": self.data_source})
                metrics.write_result(folders[name], record, predictions)
                cache.record_outputs(folders[name], key)
            log(f"baselines on {task}: {', '.join(folders)}")

    def _baseline_folders(self, task: str) -> dict[str, Path]:
        from .baselines import baseline_names

        return {name: self.out / "eval" / f"baseline_{name}" / task for name in baseline_names(task)}

    # ------------------------------------------------------------ the whole run

    def run(self) -> Path:
        from .report import build_report, write_current_results

        self.out.mkdir(parents=True, exist_ok=True)
        io.write_json(self.out / "config.json", self.config.model_dump())
        fingerprint = self.base().fingerprint
        base = ModelEntry("base", "base", "base", None, stable_hash(fingerprint))
        models = [base]
        for seed in self.config.seeds:
            experts = [self.train_cell(task, fingerprint, seed) for task in self.config.tasks]
            models += experts + [self.merge_cell(spec, experts) for spec in self.config.merges]
        rows_cache: dict[str, list[dict]] = {}
        for entry in models:
            for task in self.config.tasks:
                self.eval_cell(entry, task, fingerprint, rows_cache)
        if self.config.baselines:
            self.baseline_cells(rows_cache)
        write_current_results(self.out, self.current_results)
        return build_report(self.out)


def run_experiment(config: ExperimentConfig, out_dir: str | Path, progress: bool = True,
                   trust_remote_code: bool = False) -> Path:
    """Check every input, lock the run folder against a second run, clean what killed saves left
    behind, and run. trust_remote_code: the caller's explicit consent to a config that asks for it."""
    experiment = Experiment(config, out_dir, progress)
    experiment.preflight(trust_remote_code)
    with io.exclusive_lock(out_dir):
        io.remove_leftovers_under(out_dir)
        return experiment.run()
