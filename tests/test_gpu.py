"""The CUDA path, for a machine with a GPU (`make gpu-check`; skipped where there is none, as in
CI): training, scoring, generation, the shared base and a whole run on CUDA, in fp32 against the
CPU and in bf16 under autocast. Tiny models and a hand-made mirror: the embedded checkpoint and
the data mirror are larger than what travels to the GPU machines this project is lent."""

from __future__ import annotations

import pytest
import torch
import yaml

from loracombench import adapters, evaluation, metrics, training
from loracombench.cli import main
from loracombench.config import TrainSettings
from loracombench.evaluation import encode, left_pad
from loracombench.models import environment, load_model
from loracombench.tasks import get_task

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CPU, GPU = torch.device("cpu"), torch.device("cuda")
ROWS = [{"text": f"{w} story {i}", "label": y}
        for i in range(4) for y, w in enumerate(["war", "goal", "stocks", "chip"])]
# Without dropout: its masks come from each device's own generator, so they differ by design.
SETTINGS = TrainSettings(r=4, lora_dropout=0.0, epochs=2, batch_size=4, max_length=64, learning_rate=1e-3,
                         checkpoint_every=0)


def relative_difference(weights: dict, reference: dict) -> float:
    return max(float((weights[k].float() - reference[k].float()).norm() / reference[k].float().norm())
               for k in reference if reference[k].float().norm() > 0)


def train(fresh_tiny, folder, device: str, dtype: str, hook=None) -> tuple[dict, dict]:
    loaded = fresh_tiny()
    if hook is not None:
        loaded.model.get_output_embeddings().register_forward_hook(hook)
    meta = training.train_adapter(loaded, get_task("ag_news"), ROWS, SETTINGS, folder, device, progress=False,
                                  dtype=dtype)
    return meta, adapters.read_weights(folder)


def test_training_on_cuda_in_fp32_gives_the_cpus_adapter(tmp_path, fresh_tiny):
    cpu_meta, cpu = train(fresh_tiny, tmp_path / "cpu", "cpu", "fp32")
    gpu_meta, gpu = train(fresh_tiny, tmp_path / "gpu", "cuda", "fp32")
    assert gpu_meta["device"].startswith("cuda") and gpu_meta["dtype"] == "fp32"
    assert gpu_meta["environment"] == environment(torch.device(gpu_meta["device"]))
    assert gpu_meta["environment"]["gpu"] == torch.cuda.get_device_name()
    assert all(t.device == CPU and t.dtype == torch.float32 for t in gpu.values())  # saved as the CPU saves
    # Adam turns each first gradient into ±lr, so rounding near zero can flip an entry's step: a
    # device-placement or dtype bug moves the adapter by far more than 1%.
    assert relative_difference(gpu, cpu) < 1e-2
    assert gpu_meta["final_loss"] == pytest.approx(cpu_meta["final_loss"], rel=1e-3)


def test_bf16_training_on_cuda_runs_under_autocast_and_keeps_fp32_adapter_weights(tmp_path, fresh_tiny):
    projected = []
    _, fp32 = train(fresh_tiny, tmp_path / "fp32", "cuda", "fp32")
    meta, bf16 = train(fresh_tiny, tmp_path / "bf16", "cuda", "bf16",
                       hook=lambda module, args, output: projected.append(output.dtype))
    assert meta["dtype"] == "bf16" and set(projected) == {torch.bfloat16}
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in bf16.values())
    # The same run in a coarser arithmetic: close to fp32's, not equal to it.
    assert 0 < relative_difference(bf16, fp32) < 0.2


# Absolute, in nats: the random tiny model's log-likelihoods all sit near -10.8, so a tolerance
# scaled by their size would pass a scorer that ignores the model (0.17 nats off on the CPU) or
# reads another model's weights (0.31); CPU bf16 autocast is 0.0012 off.
@pytest.mark.parametrize("dtype, tolerance", [("fp32", 1e-3), ("bf16", 0.03)])
def test_scoring_on_cuda_agrees_with_the_cpu(fresh_tiny, dtype, tolerance):
    loaded, task = fresh_tiny(), get_task("ag_news")
    cpu = evaluation.score_choices(loaded.model, loaded.tokenizer, task, ROWS, 4, False, "fp32")
    gpu = evaluation.score_choices(loaded.model.to(GPU), loaded.tokenizer, task, ROWS, 4, False, dtype)
    assert max(abs(a - b) for x, y in zip(cpu, gpu) for a, b in zip(x, y)) < tolerance


def test_greedy_decoding_on_cuda_equals_transformers_generate_there(fresh_tiny):
    loaded = fresh_tiny()
    model, tok = loaded.model.to(GPU).eval(), loaded.tokenizer
    prompts = ["Question: What is 2 plus 2?\nAnswer:", "Hi", "A much longer prompt about markets " * 3, "Topic:"]
    tokens = evaluation.greedy_tokens(model, tok, [encode(tok, p) for p in prompts], 10, stops=(), dtype="fp32")
    batch = left_pad([encode(tok, p) for p in prompts], tok.pad_token_id, GPU)
    batch.pop("position_ids")
    with torch.no_grad():
        expected = model.generate(**batch, do_sample=False, max_new_tokens=10, pad_token_id=tok.pad_token_id,
                                  eos_token_id=None)
    assert tokens == expected[:, batch["input_ids"].shape[1]:].tolist()


def test_the_shared_base_on_cuda_comes_back_bit_for_bit(tmp_path):
    shared = adapters.SharedBase(load_model("tiny-llama"), device=GPU, snapshot_dir=tmp_path)
    loaded = {name: p.detach().clone() for name, p in shared.loaded.model.named_parameters()}
    assert all(p.is_cuda for p in loaded.values())
    with shared.borrowed() as borrowed, torch.no_grad():
        for p in borrowed.model.parameters():
            p.mul_(-3.0).add_(1.0)
    restored = dict(shared.loaded.model.named_parameters())
    assert all(restored[name].is_cuda and torch.equal(restored[name], value) for name, value in loaded.items())


@pytest.mark.parametrize("dtype", ["fp32", "auto"])
def test_a_whole_run_on_cuda_records_its_gpu_and_precision(tmp_path, small_mirror, dtype):
    config = {"name": "gpu", "model": "tiny-llama", "device": "cuda", "dtype": dtype,
              "n_train": {"ag_news": 8, "gsm8k": 4}, "train": {"epochs": 1, "batch_size": 4, "max_length": 64},
              "eval": {"n_eval": {"ag_news": 8, "gsm8k": 3}, "n_generate": 2, "max_new_tokens": 4},
              "merges": [{"method": "average"}, {"method": "ties"}], "baselines": False}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = ["run", "--config", str(path), "--data-dir", str(small_mirror), "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "eval").rglob("metrics.json")}
    records = [metrics.read_result(p.parent) for p in written]
    assert len(records) == 10  # base, two experts, two merges, each on two tasks
    assert {r["environment"]["device"] for r in records} == {"cuda:0"}
    assert {r["environment"]["gpu"] for r in records} == {torch.cuda.get_device_name(0)}
    assert torch.cuda.get_device_name(0) in (tmp_path / "run" / "results.md").read_text()
    assert main(argv) == 0  # a second run finds every cell done and rewrites no result
    assert {p: p.stat().st_mtime_ns for p in written} == written
