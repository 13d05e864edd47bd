"""Cache keys: a cell is keyed on everything that decides its output (the rows it reads by
content, the libraries that compute it, typed merge parameters) and on nothing that does not
(where the data or the base model sit on disk, the model's eval settings for a classical baseline)."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

from conftest import make_small_mirror
from loracombench import adapters, cache, io
from loracombench.compose.base import OneModel
from loracombench.config import ExperimentConfig
from loracombench.pipeline import Cell, Experiment, ModelEntry
from loracombench.tasks import get_task

ROUTER = "compose route_classifier_cv_folds2"  # a composition is named by its method and parameters
FINGERPRINT = {"name": "tiny-llama", "weights": "w"}
CONFIG = dict(model="tiny-llama", tasks=["ag_news", "gsm8k"], n_train={"ag_news": 8, "gsm8k": 4},
              train={"epochs": 1, "batch_size": 4, "max_length": 96},
              eval={"n_eval": {"ag_news": 8, "gsm8k": 3}, "n_generate": 0},
              merges=[{"method": "average"}, {"method": "ties", "label": "ties", "params": {"lam": 1}}],
              compositions=[{"method": "route_classifier", "params": {"cv_folds": 2}}])


def keys(data_dir: Path, tmp_path: Path, **changes) -> dict[str, str]:
    """Every cell key of a tiny run, with top-level config `changes` (dicts are merged in)."""
    raw = json.loads(json.dumps(CONFIG))
    for name, value in changes.items():
        raw[name] = {**raw[name], **value} if isinstance(value, dict) else value
    experiment = Experiment(ExperimentConfig(**raw, data_dir=str(data_dir)), tmp_path / "run", progress=False)
    found, experts = {}, {}
    for task in experiment.config.tasks:
        found[f"train {task}"] = experiment.train_cell(task, FINGERPRINT, 0).key
        experts[task] = ModelEntry(f"expert_{task}", task, "expert", f"expert-{task}", lambda: OneModel(None), 0,
                                   adapter=Path("/nowhere"))
    for name, composition in experiment.compositions():
        found[f"compose {name}"] = experiment.composition_cell(name, composition, experts, FINGERPRINT, 0).key
    base = ModelEntry("base", "base", "base", "base-key", lambda: OneModel(None))
    for task in experiment.config.tasks:
        found[f"eval base {task}"] = experiment.eval_cell(base, task, FINGERPRINT).key
    found.update({cell.what: cell.key for cell in experiment.baseline_cells()})
    return found


def changed(before: dict, after: dict) -> set[str]:
    return {name for name in before if before[name] != after[name]}


def test_the_data_is_keyed_by_the_rows_read_not_by_where_the_mirror_is(tmp_path):
    here, there = make_small_mirror(tmp_path / "here"), tmp_path / "there"
    shutil.copytree(here, there)
    before = keys(here, tmp_path)
    assert keys(there, tmp_path) == before  # the same rows at another path
    rows = (there / "gsm8k" / "test.jsonl").read_text().splitlines()
    (there / "gsm8k" / "test.jsonl").write_text("\n".join([rows[0].replace("apples", "pears"), *rows[1:]]) + "\n")
    assert changed(before, keys(there, tmp_path)) == {"eval base gsm8k", *(
        name for name in before if name.startswith("baseline") and name.endswith("gsm8k"))}
    train = there / "ag_news" / "train.jsonl"
    train.write_text(train.read_text().replace("story", "tale"))
    after = keys(there, tmp_path)
    assert "train ag_news" in changed(before, after) and ROUTER in changed(before, after)
    assert "train gsm8k" not in changed(before, after)


def test_a_baseline_is_not_recomputed_for_settings_only_the_language_model_reads(tmp_path):
    mirror = make_small_mirror(tmp_path / "mirror")
    before = keys(mirror, tmp_path)
    after = keys(mirror, tmp_path, eval={"batch_size": 2, "max_new_tokens": 9}, dtype="fp32")
    assert not any(name.startswith("baseline") for name in changed(before, after))
    assert "eval base ag_news" in changed(before, after)


def test_a_merge_parameter_is_keyed_by_its_value_not_how_it_was_written(tmp_path):
    mirror = make_small_mirror(tmp_path / "mirror")
    written = [{"method": "average"}, {"method": "ties", "label": "ties", "params": {"lam": 1.0, "density": 0.2}}]
    assert keys(mirror, tmp_path) == keys(mirror, tmp_path, merges=written)  # 1 is 1.0; 0.2 is the default
    other = [{"method": "average"}, {"method": "ties", "label": "ties", "params": {"lam": 0.5}}]
    assert changed(keys(mirror, tmp_path), keys(mirror, tmp_path, merges=other)) == {"compose ties"}


def test_a_composition_is_keyed_by_the_versions_of_the_libraries_that_fit_it(tmp_path, monkeypatch):
    mirror = make_small_mirror(tmp_path / "mirror")
    before = keys(mirror, tmp_path)
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "0.0-other" if name == "scikit-learn" else real(name))
    after = keys(mirror, tmp_path)
    # The router's TF-IDF and logistic regression, and the classical baselines, are scikit-learn's.
    assert changed(before, after) == {ROUTER, *(n for n in before if n.startswith("baseline"))}


def test_a_task_is_keyed_by_every_module_its_class_is_made_of(monkeypatch):
    """GSM8K's baselines answer through Gsm8kAnalysis.answer_as_output, in gsm8k_analysis.py."""
    from loracombench.tasks import base

    gsm8k, ag_news = get_task("gsm8k"), get_task("ag_news")
    before = gsm8k.fingerprint(), ag_news.fingerprint()
    real = base._source
    monkeypatch.setattr(base, "_source", lambda obj: real(obj) + ("# edited" if getattr(
        obj, "__name__", "") == "loracombench.tasks.gsm8k_analysis" else ""))
    assert gsm8k.fingerprint() != before[0] and ag_news.fingerprint() == before[1]


def test_where_the_base_model_was_is_not_part_of_a_models_output_key(tmp_path):
    """The adapter config records the base's path on the machine that trained it (an absolute cache
    path for the embedded model): the same weights trained elsewhere must key the same."""
    def output_key(folder: Path, base_path: str) -> str:
        io.write_json(folder / adapters.CONFIG_FILE, {"r": 4, "base_model_name_or_path": base_path})
        (folder / adapters.WEIGHTS_FILE).write_bytes(b"weights")
        cell = Cell("train", folder, "cell-key", lambda: None)
        cache.record_outputs(folder, "cell-key")
        return cell.output_key()

    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    assert output_key(here, "/root/.cache/a") == output_key(there, "/home/b/.cache/a")
    io.write_json(there / adapters.CONFIG_FILE, {"r": 8, "base_model_name_or_path": "/home/b/.cache/a"})
    cache.record_outputs(there, "cell-key")
    assert Cell("train", there, "cell-key", lambda: None).output_key() != output_key(here, "/root/.cache/a")


def test_the_learning_rate_sweep_scores_in_the_configs_precision_and_keys_it(tmp_path, monkeypatch):
    """It scored in "auto" whatever the config's dtype, and its key said "auto"."""
    from loracombench import sweep

    mirror = make_small_mirror(tmp_path / "mirror")
    experiment = Experiment(ExperimentConfig(**CONFIG, data_dir=str(mirror), dtype="fp32"), tmp_path / "run")
    captured, scored = {}, []
    monkeypatch.setattr(sweep, "cell_key", lambda parts, task: captured.update(parts) or "key")
    monkeypatch.setattr(sweep.Cell, "ensure", lambda self: self.compute())  # computed, not looked up
    monkeypatch.setattr(sweep, "evaluate_composed", lambda *args, **kwargs: scored.append(args[4].dtype))
    monkeypatch.setattr(sweep, "read_result", lambda folder: {})
    entry = ModelEntry("expert", "expert", "expert", "expert-key", lambda: OneModel(None), 0)
    sweep.score_cell(experiment, entry, get_task("ag_news"), experiment.train_rows("ag_news"), tmp_path / "cell")
    assert scored == [captured["eval"]["dtype"]] == [experiment.precision] == ["fp32"]


def test_the_base_fingerprint_holds_the_tokenizer_so_a_changed_one_makes_other_keys():
    from loracombench.models import load_model, load_tokenizer, tokenizer_hash

    loaded = load_model("tiny-llama")
    assert loaded.fingerprint["tokenizer"] == tokenizer_hash(loaded.tokenizer)
    tokenizer = load_tokenizer("smollm2-135m")  # a fresh object: the tiny models' is shared
    before = tokenizer_hash(tokenizer)
    tokenizer.add_tokens(["<a-new-token>"])
    after = tokenizer_hash(tokenizer)
    tokenizer.pad_token = "<a-new-token>"
    assert len({before, after, tokenizer_hash(tokenizer)}) == 3


def test_a_baseline_is_keyed_by_the_code_that_fits_it(tmp_path, monkeypatch):
    from loracombench import baselines
    from loracombench.tasks import classical

    mirror = make_small_mirror(tmp_path / "mirror")
    before = keys(mirror, tmp_path)
    real = baselines.inspect.getsource
    monkeypatch.setattr(baselines.inspect, "getsource", lambda obj: real(obj) + ("# edited" if obj is classical else ""))
    assert changed(before, keys(mirror, tmp_path)) == {name for name in before if name.startswith("baseline")}
