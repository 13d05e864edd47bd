"""The baselines give exactly the results main's code gave (commit b061dc2, before baselines moved
into the task modules) on a fixed sample of the real mirror: same names and order, same metrics,
same predictions, same result-record config."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import MIRROR, needs_mirror

from loracombench import baselines, metrics
from loracombench.data import load_sample

GOLDEN = Path(__file__).parent / "golden" / "baselines_b061dc2.json"
# (task, train rows, test rows): small enough for a few seconds, large enough that every
# baseline predicts more than one class and the nearest neighbour finds different answers.
SAMPLES = (("ag_news", 400, 200), ("gsm8k", 500, 100))
# What says when and on what the record was made, not what it found (tested in test_environment.py),
# and the provenance records gained after b061dc2: the task's version (test_evaluation.py) and each
# prediction's dataset row, checked here against the rows scored.
VOLATILE = ("elapsed_s", "created", "environment", "task_version")


def digest(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def baseline_results(out_dir: Path) -> dict:
    """Per task and baseline: its result record (less run time and date) and its predictions' hash."""
    results = {"order": {}}
    for task, n_train, n_test in SAMPLES:
        train = load_sample(task, "train", n_train, seed=0, data_dir=MIRROR)
        test = load_sample(task, "test", n_test, seed=0, data_dir=MIRROR)
        folders = baselines.run_baselines(task, train, test, out_dir / task, seed=0)
        results["order"][task] = [folder.name for folder in folders]
        for folder in folders:
            record = {k: v for k, v in metrics.read_result(folder).items() if k not in VOLATILE}
            predictions = metrics.read_predictions(folder)
            assert [p.pop("doc") for p in predictions] == test
            results[f"{task}/{folder.name}"] = {"record": record, "predictions": digest(predictions)}
    return results


@needs_mirror
def test_baselines_reproduce_mains_results(tmp_path):
    assert baseline_results(tmp_path) == json.loads(GOLDEN.read_text())


if __name__ == "__main__":  # regenerate the golden file (only from the code it is meant to pin)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(baseline_results(Path(tmp)), indent=1, sort_keys=True) + "\n")
