"""Precision: `dtype` in the config and on the train command line, resolved per device; bf16 and
fp16 run under autocast with fp32 weights, fp32 runs as plain fp32, fp16 is refused on CPU."""

from __future__ import annotations

import contextlib

import pytest
import torch

from loracombench import training
from loracombench.cli import main
from loracombench.config import ConfigError, ExperimentConfig, TrainSettings, load_config
from loracombench.distributed import World
from loracombench.models import ModelError, autocast, resolve_dtype
from loracombench.tasks import get_task

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
ROWS = [{"text": f"{w} story {i}", "label": y} for i in range(2) for y, w in enumerate(["war", "goal", "stocks", "chip"])]


@pytest.mark.parametrize("name, device, expected", [
    ("auto", CPU, torch.float32), ("auto", CUDA, torch.bfloat16), ("fp32", CUDA, torch.float32),
    ("bf16", CPU, torch.bfloat16), ("bf16", CUDA, torch.bfloat16), ("fp16", CUDA, torch.float16),
])
def test_each_precision_resolves_per_device(name, device, expected):
    assert resolve_dtype(name, device) == expected


def test_fp16_on_cpu_and_unknown_precisions_are_refused_in_one_line():
    with pytest.raises(ModelError, match=r"^--dtype fp16 needs a CUDA device.*on CPU use fp32") as err:
        resolve_dtype("fp16", CPU)
    assert "\n" not in str(err.value)
    with pytest.raises(ModelError, match=r"^--dtype 'fp64' is not a precision; valid: auto, fp32, bf16, fp16$"):
        resolve_dtype("fp64", CUDA)


def test_autocast_is_plain_fp32_or_autocast_in_the_precision_asked():
    assert isinstance(autocast(CPU), contextlib.nullcontext)
    assert isinstance(autocast(CPU, "fp32"), contextlib.nullcontext)
    weight, x = torch.randn(4, 4), torch.randn(2, 4)
    with autocast(CPU, "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (x @ weight).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    with autocast(CPU, "fp32"):
        assert (x @ weight).dtype == torch.float32
    with pytest.raises(ModelError, match="fp16 needs a CUDA device"):
        autocast(CPU, "fp16")


def test_config_dtype_defaults_to_auto_and_is_checked_against_the_device():
    assert ExperimentConfig().dtype == "auto"
    assert ExperimentConfig(dtype="bf16").dtype == "bf16"
    with pytest.raises(ConfigError, match=r"dtype: 'fp64' is not a precision; valid: auto, fp32, bf16, fp16$"):
        load_config("smoke", {"dtype": "fp64"})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="smoke.yaml: dtype fp16 needs a CUDA device"):
            load_config("smoke", {"dtype": "fp16"})
        with pytest.raises(ConfigError, match="smoke.yaml: dtype fp16 needs a CUDA device"):
            load_config("smoke", {"dtype": "fp16", "device": "cpu"})


@pytest.mark.parametrize("dtype, message", [
    ("fp16", "--dtype fp16 needs a CUDA device"),
    ("half", "--dtype 'half' is not a precision; valid: auto, fp32, bf16, fp16"),
])
def test_train_command_refuses_a_precision_in_one_line_before_writing(tmp_path, small_mirror, capsys, dtype, message):
    if dtype == "fp16" and torch.cuda.is_available():
        pytest.skip("fp16 is valid where CUDA is present")
    out = tmp_path / "adapter"
    status = main(["train", "--task", "ag_news", "--model", "tiny-llama", "--data-dir", str(small_mirror),
                   "--device", "cpu", "--dtype", dtype, "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and message in err and err.count("\n") == 1
    assert not out.exists()


def test_bf16_training_on_cpu_runs_under_autocast_and_keeps_fp32_weights(tmp_path, fresh_tiny):
    config = TrainSettings(r=4, epochs=1, batch_size=4, max_length=64, learning_rate=5e-3, checkpoint_every=0)
    losses = {}
    for dtype in ("fp32", "bf16"):
        loaded = fresh_tiny()
        meta = training.train_adapter(loaded, get_task("ag_news"), ROWS, config, tmp_path / dtype, "cpu",
                                      progress=False, dtype=dtype)
        assert meta["dtype"] == dtype
        assert {p.dtype for p in loaded.model.parameters() if p.requires_grad} == {torch.float32}
        losses[dtype] = meta["final_loss"]
    # bf16 rounding changes the loss: the forward passes did run in bf16.
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_fp16_loss_scaling_gives_exactly_the_unscaled_update(fresh_tiny):
    """fp16 training scales the loss by a power of two (GradScaler) and unscales the gradients before
    the update, which is then exactly the update without scaling (AdamW's eps would show a
    scaled gradient). GradScaler runs on CPU too, so the law is checked here in fp32."""
    config = TrainSettings(r=4, lora_dropout=0.0)
    updated, gradients = [], {}
    for scaling in (False, True):
        loaded = fresh_tiny()
        model = training.init_lora(loaded.model, config, "ag_news")
        lora = [p for p in model.parameters() if p.requires_grad]
        # lora_B's gradient as backward leaves it, before any unscaling (lora_A's is 0: B starts at 0).
        first_b = next(p for name, p in model.named_parameters() if "lora_B" in name)
        first_b.register_hook(lambda grad, scaling=scaling: gradients.setdefault(scaling, grad.abs().max().item())
                              and None)
        optimizer = torch.optim.AdamW(lora, lr=5e-3)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=scaling)
        trainer = training.Trainer(model, optimizer, schedule, scaler, loaded.tokenizer.pad_token_id, CPU,
                                   torch.float32, World())
        task = get_task("ag_news")
        examples = [training.encode_example(loaded.tokenizer, task.prompt(r), task.target(r), 64, False) for r in ROWS]
        trainer.step([examples[:4], examples[4:]])
        assert scaler.is_enabled() is scaling and (not scaling or scaler.get_scale() == 2.0 ** 16)
        updated.append([p.detach().clone() for p in lora])
    assert all(torch.equal(plain, scaled) for plain, scaled in zip(*updated))
    # The loss really was scaled: without it both runs would agree trivially.
    assert gradients[True] == pytest.approx(2.0 ** 16 * gradients[False], rel=1e-4) and gradients[False] > 0


def test_cells_run_in_the_precision_their_key_was_made_for(tmp_path, small_mirror, monkeypatch):
    """The driver makes the keys; a worker elsewhere (a GPU node of a Ray cluster) must run the
    precision the key names, not resolve "auto" again on its own device."""
    from loracombench import pipeline

    config = load_config("smoke", {"data_dir": str(small_mirror), "model": "tiny-llama"})
    experiment = pipeline.Experiment(config, tmp_path / "run", progress=False)
    passed = {}
    monkeypatch.setattr(training, "train_adapter", lambda *args, **kwargs: passed.update(dtype=kwargs["dtype"])
                        or {"final_loss": 0.0})
    cell = experiment.train_cell("ag_news", {"fingerprint": "f"}, 0)
    experiment.shared  # loaded on this CPU before the device is faked
    monkeypatch.setattr(pipeline, "pick_device", lambda requested: CUDA)  # the worker has a GPU
    cell.compute()
    assert passed["dtype"] == "fp32"  # the precision this CPU driver keyed the cell with


@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_a_gpu_without_bf16_arithmetic_is_fp32(monkeypatch, native_bf16, expected):
    """Before Ampere a GPU has no bf16 arithmetic, and autocast would emulate it, slowly."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # As a real pre-Ampere GPU answers: bf16 "supported" when emulation counts, not natively.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)
    assert resolve_dtype("auto", CUDA) == expected
    assert resolve_dtype("bf16", CUDA) == torch.bfloat16  # asked for by name, it is what it says
