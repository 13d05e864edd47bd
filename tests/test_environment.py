"""Every result and every trained adapter records what computed it: the code's versions and the
device's kernels (models.environment), read from the running process rather than assumed."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import torch
import yaml

from loracombench import adapters, baselines, cache, io, metrics, report, training
from loracombench.cli import main
from loracombench.config import TrainSettings
from loracombench.evaluation import EvalConfig, evaluate
from loracombench.models import environment
from loracombench.tasks import get_task

CPU = torch.device("cpu")
ROWS = [{"text": f"{w} story {i}", "label": y}
        for i in range(2) for y, w in enumerate(["war", "goal", "stocks", "chip"])]


def test_the_cpu_record_names_the_kernels_aten_runs_and_the_library_versions():
    record = environment(CPU)
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["torch"] == importlib.metadata.version("torch")
    assert record["transformers"] == importlib.metadata.version("transformers")
    assert record["peft"] == importlib.metadata.version("peft")
    assert record["device"] == "cpu" and record["torch_threads"] == torch.get_num_threads()
    assert "gpu" not in record


def test_the_cpu_capability_follows_a_pin_set_for_the_process():
    """ATEN_CPU_CAPABILITY changes the kernels, and with them the last bits: the record must say so."""
    child = subprocess.run([sys.executable, "-c", "import torch; from loracombench.models import environment; "
                            "print(environment(torch.device('cpu'))['cpu_capability'])"],
                           env={**os.environ, "ATEN_CPU_CAPABILITY": "default"}, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split()[-1] == "DEFAULT"


def test_a_cuda_record_names_the_gpu_and_cuda_instead(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU 80GB")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    record = environment(torch.device("cuda:0"))
    assert record["gpu"] == "Some GPU 80GB" and record["cuda"] == "12.8" and record["device"] == "cuda:0"
    assert "cpu_capability" not in record


def test_an_evaluation_result_records_its_environment(tmp_path, tiny_gpt2):
    evaluate(tiny_gpt2.model, tiny_gpt2.tokenizer, get_task("ag_news"), ROWS, EvalConfig(batch_size=4), {},
             tmp_path, progress=False)
    assert metrics.read_result(tmp_path)["environment"] == environment(CPU)


def test_a_trained_adapter_records_its_environment(tmp_path, fresh_tiny):
    settings = TrainSettings(r=4, epochs=1, batch_size=4, max_length=64, checkpoint_every=0)
    meta = training.train_adapter(fresh_tiny(), get_task("ag_news"), ROWS, settings, tmp_path / "adapter", "cpu",
                                  progress=False)
    assert meta["environment"] == environment(CPU)
    assert io.read_json(tmp_path / "adapter" / adapters.METADATA_FILE)["environment"] == environment(CPU)


def test_a_baseline_result_records_the_versions_of_its_libraries(tmp_path):
    [folder, *_] = baselines.run_baselines("ag_news", ROWS, ROWS, tmp_path)
    assert metrics.read_result(folder)["environment"] == cache.code_versions(cache.BASELINE_LIBRARIES)
    assert metrics.read_result(folder)["environment"]["scikit-learn"] is not None


def test_every_result_of_a_run_records_its_environment(tmp_path, small_mirror):
    config = {"name": "t", "model": "tiny-llama", "n_train": {"ag_news": 8, "gsm8k": 4},
              "train": {"epochs": 1, "batch_size": 4, "max_length": 64},
              "eval": {"n_eval": {"ag_news": 8, "gsm8k": 3}, "n_generate": 0, "max_new_tokens": 4},
              "merges": [{"method": "average"}], "baselines": True}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path), "--data-dir", str(small_mirror), "--out", str(tmp_path / "run")]) == 0
    records = {folder.parent.name + "/" + folder.name: metrics.read_result(folder)
               for folder in {p.parent for p in (tmp_path / "run" / "eval").rglob("metrics.json")}}
    model_results = {name: r for name, r in records.items() if r["model"]["kind"] != "baseline"}
    baseline_results = {name: r for name, r in records.items() if r["model"]["kind"] == "baseline"}
    assert len(model_results) == 8 and baseline_results
    assert all(r["environment"] == environment(CPU) for r in model_results.values())
    assert all(r["environment"] == cache.code_versions(cache.BASELINE_LIBRARIES) for r in baseline_results.values())
    assert f"- computed with {report.describe_environment(environment(CPU))}.\n" in (tmp_path / "run" / "results.md"
                                                                                   ).read_text()


def record_of(kind: str, environment_record: dict | None) -> dict:
    return {"model": {"label": kind, "kind": kind}, **({"environment": environment_record}
                                                       if environment_record is not None else {})}


def test_the_report_lists_each_environment_of_a_mixed_table_with_its_count():
    here = environment(CPU)
    avx2 = {**here, "cpu_capability": "AVX2", "torch_threads": 2}
    gpu = {**cache.code_versions(), "device": "cuda:0", "torch_threads": 8, "cuda": "12.8", "gpu": "Some GPU"}
    records = [record_of("merge", avx2), record_of("merge", avx2), record_of("expert", gpu),
               record_of("base", None), record_of("baseline", {"scikit-learn": "1.0"})]
    note = report.environment_note(records)
    assert note.startswith("computed in several environments")
    assert f"{report.describe_environment(avx2)} (2 results)" in note and "(AVX2 kernels, 2 threads)" in note
    assert f"{report.describe_environment(gpu)} (1 result)" in note and "cuda:0 (Some GPU, CUDA 12.8)" in note
    assert "an unrecorded environment (results written before environments were recorded) (1 result)" in note
    assert "scikit-learn" not in note
    assert report.environment_note([record_of("merge", avx2)]) == f"computed with {report.describe_environment(avx2)}."
    assert report.environment_note([record_of("baseline", {})]) is None
