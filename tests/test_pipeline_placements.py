"""The place stage: every other composed model of a run is scored on each weight sweep's
validation rows, ranked within its grid and marked on its plot (issue 8)."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from loracombench import adapters, io
from loracombench.cli import main
from loracombench.compose import get_composition
from loracombench.compose.weight_sweep import (PLACED_DIR, PLACED_FILE, PLACEMENT_FILE, PLOT_ALL_FILE, SWEEP_FILE,
                                               grid_rank, score_composed)
from loracombench.models import load_model

SMOKE = {
    "name": "t", "model": "tiny-llama", "n_train": {"ag_news": 8, "gsm8k": 4}, "baselines": False,
    "train": {"epochs": 1, "batch_size": 4, "max_length": 64},
    "eval": {"n_eval": {"ag_news": 4, "gsm8k": 2}, "n_generate": 0, "max_new_tokens": 4},
    # task arithmetic at (1, 1) is also the sweep's grid point (1.0, 1.0)
    "merges": [{"method": "task_arithmetic", "label": "ta_ones", "weights": [1.0, 1.0]}],
    "compositions": [{"method": "route_oracle"},
                     {"method": "weight_sweep", "label": "ta_sweep",
                      "params": {"method": "task_arithmetic", "weights": [0.0, 1.0], "n_validation": 2}}],
}


def test_other_models_are_placed_in_the_sweep_on_its_validation_rows_and_reused(tmp_path, small_mirror, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(SMOKE))
    out = tmp_path / "run"
    argv = ["run", "--config", str(config), "--data-dir", str(small_mirror), "--out", str(out)]
    assert main(argv) == 0
    sweep_dir = out / "compositions" / "seed0" / "ta_sweep"
    sweep = io.read_json(sweep_dir / SWEEP_FILE)
    placed = io.read_json(sweep_dir / PLACED_FILE)["placed"]
    assert [p["label"] for p in placed] == ["merge: ta_ones", "route_oracle"]  # the sweep itself is not placed
    assert sorted(p.name for p in (sweep_dir / PLACED_DIR).iterdir()) == ["route_oracle", "ta_ones"]
    assert (sweep_dir / PLOT_ALL_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_label = {p["label"]: p for p in placed}
    for p in placed:
        assert p["grid_rank"] == grid_rank(sweep, p["metrics"])
        assert p["within_best_share"] == (p["grid_rank"] <= 0.1)

    # A static merge whose weights are a grid point scores on validation as that point did.
    (point,) = [p for p in sweep["points"] if p["weights"] == [1.0, 1.0]]
    assert by_label["merge: ta_ones"]["metrics"] == point["metrics"]
    assert by_label["merge: ta_ones"]["objective"] == point["objective"]

    # Placed metrics are score_composed's, on a base model loaded afresh.
    shared = adapters.SharedBase(load_model("tiny-llama"))
    merge = get_composition("static_merge", {"method": "task_arithmetic", "weights": [1.0, 1.0]})
    oracle = get_composition("route_oracle")
    for label, composed in (("merge: ta_ones", merge.load(out / "merges" / "seed0" / "ta_ones")),
                            ("route_oracle", oracle.load(out / "compositions" / "seed0" / "route_oracle"))):
        assert by_label[label]["metrics"] == score_composed(composed, shared, sweep_dir, label)
    log = capsys.readouterr().out
    assert f"{sweep_dir / PLACED_FILE}" in log and f"{sweep_dir / PLOT_ALL_FILE}" in log

    built_before = io.read_json(sweep_dir / "cell_manifest.json")
    summary_written = (sweep_dir / PLACED_FILE).stat().st_mtime_ns
    assert main(argv) == 0  # a rerun reuses the sweep and every placement
    log = capsys.readouterr().out
    assert "compose ta_sweep (seed 0): cached" in log
    for name in ("ta_ones", "route_oracle"):
        assert f"place {name} in ta_sweep (seed 0): cached" in log
    assert io.read_json(sweep_dir / "cell_manifest.json") == built_before
    assert (sweep_dir / PLACED_FILE).stat().st_mtime_ns == summary_written
    assert (sweep_dir / PLACED_DIR / "route_oracle" / PLACEMENT_FILE).is_file()


def test_sweeps_on_the_same_rows_place_each_model_after_one_scoring(tmp_path, small_mirror, monkeypatch):
    from loracombench.compose import weight_sweep

    config = dict(SMOKE, compositions=SMOKE["compositions"] + [
        {"method": "weight_sweep", "label": "ta_sweep_fine",
         "params": {"method": "task_arithmetic", "weights": [0.0, 0.5, 1.0], "n_validation": 2}}])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    scored = []
    original = weight_sweep.score_composed
    monkeypatch.setattr(weight_sweep, "score_composed",
                        lambda composed, shared, sweep_dir, label="model": scored.append(label)
                        or original(composed, shared, sweep_dir, label))
    out = tmp_path / "run"
    assert main(["run", "--config", str(path), "--data-dir", str(small_mirror), "--out", str(out)]) == 0
    assert sorted(scored) == ["merge: ta_ones", "route_oracle"]  # once each, for both sweeps
    placed = [{p["label"]: p for p in io.read_json(out / "compositions" / "seed0" / name / PLACED_FILE)["placed"]}
              for name in ("ta_sweep", "ta_sweep_fine")]
    for label in ("merge: ta_ones", "route_oracle"):
        assert placed[0][label]["metrics"] == placed[1][label]["metrics"]
        sweep = io.read_json(out / "compositions" / "seed0" / "ta_sweep_fine" / SWEEP_FILE)
        assert placed[1][label]["grid_rank"] == grid_rank(sweep, placed[1][label]["metrics"])


def test_a_placement_records_how_many_of_the_sweeps_rows_the_model_was_fitted_on(tmp_path, small_mirror, capsys):
    """LoraHub searches on validation rows, and the sweep's rows are drawn from the same split:
    where they are shared, its placement is in-sample, and placed.json and the plot say so."""
    from loracombench.compose.weight_sweep import VALIDATION_FILE
    from loracombench.config import ExperimentConfig
    from loracombench.data import row_key, validation_sample
    from loracombench.pipeline import Experiment

    lorahub = {"method": "lorahub", "label": "hub", "params": {"budget": 2, "n_validation": 2}}
    config = dict(SMOKE, merges=[], compositions=SMOKE["compositions"] + [lorahub])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    assert main(["run", "--config", str(path), "--data-dir", str(small_mirror), "--out", str(out)]) == 0
    sweep_dir = out / "compositions" / "seed0" / "ta_sweep"
    placed = {p["label"]: p for p in io.read_json(sweep_dir / PLACED_FILE)["placed"]}
    # LoraHub's rows, drawn here as the data module draws them (eval seed 1234), not through the run.
    experiment = Experiment(ExperimentConfig(**{**config, "data_dir": str(small_mirror)}), tmp_path / "unused")
    expected = {}
    for task, rows in io.read_json(sweep_dir / VALIDATION_FILE).items():
        searched = {row_key(r) for r in validation_sample(task, 2, 1234, small_mirror, experiment.train_rows(task))}
        expected[task] = {"fitted": sum(row_key(r) in searched for r in rows), "rows": len(rows)}
    assert placed["hub"]["fitted_on_rows"] == expected
    assert expected["gsm8k"]["fitted"] == 2  # GSM8K's held-out rows are so few that it used them all
    assert all(c["fitted"] == 0 for c in placed["route_oracle"]["fitted_on_rows"].values())

    # scripts/placement_overlap.py, behind the README's counts, prints the same from the data alone.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import placement_overlap

    path.write_text(yaml.safe_dump({**config, "data_dir": str(small_mirror)}))
    placement_overlap.main([str(path)])
    text = ", ".join(f"{c['fitted']} of {c['rows']} {task}" for task, c in expected.items())
    assert f"| {path} | ta_sweep | hub | {text} |" in capsys.readouterr().out


def test_the_plot_legend_names_a_placed_models_fitted_rows():
    from loracombench.compose.weight_sweep import fitted_note

    assert fitted_note({"fitted_on_rows": {"ag_news": {"fitted": 3, "rows": 50},
                                           "gsm8k": {"fitted": 20, "rows": 20}}}) == \
        " (fitted on 3/50 ag_news, 20/20 gsm8k rows)"
    assert fitted_note({"fitted_on_rows": {"ag_news": {"fitted": 0, "rows": 50}}}) == ""
    assert fitted_note({}) == ""  # a placement recorded before the count existed
