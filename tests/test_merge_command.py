"""The merge command end to end: files in, PEFT adapter out, every refusal writes nothing."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from loracombench import adapters
from loracombench.cli import main
from loracombench.models import load_model


def make_adapter(path, seed, base="tiny-llama", r=4, alpha=12, with_metadata=True, targets=("q_proj", "v_proj")):
    """A saved adapter with random A and B (init_lora_weights=False), as PEFT itself writes it."""
    loaded = load_model(base)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
    model = get_peft_model(loaded.model, config)
    model.peft_config["default"].base_model_name_or_path = loaded.path
    if with_metadata:
        adapters.save_peft_model(model, path, {"kind": "trained", "task": f"t{seed}", "base_model": loaded.fingerprint})
    else:
        model.save_pretrained(path)
    return path


@pytest.fixture
def two_adapters(tmp_path):
    return make_adapter(tmp_path / "a", 1), make_adapter(tmp_path / "b", 2)


def test_average_is_the_elementwise_factor_mean_with_alpha_not_r(tmp_path, two_adapters):
    out = tmp_path / "avg"
    assert main(["merge", "--method", "average", "--adapters", *map(str, two_adapters), "--out", str(out)]) == 0
    a, b = (adapters.read_adapter(p) for p in two_adapters)
    merged = adapters.read_adapter(out)
    assert merged.metadata["kind"] == "merge" and merged.metadata["base_model"] == a.fingerprint
    for module, fa in a.factors.items():
        fb = b.factors[module]
        assert fa.scale == 3.0  # alpha 12 / r 4
        expected = 3.0 * ((fa.lora_B + fb.lora_B) / 2) @ ((fa.lora_A + fb.lora_A) / 2)
        torch.testing.assert_close(merged.factors[module].delta_weight(), expected, rtol=1e-5, atol=1e-6)
    # The merged folder is a plain PEFT adapter that reproduces s·mean(B)·mean(A) in the model.
    model = PeftModel.from_pretrained(load_model("tiny-llama").model, str(out))
    layer = dict(model.named_modules())["base_model.model.model.layers.0.self_attn.q_proj"]
    module = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(layer.get_delta_weight("default"), merged.factors[module].delta_weight())


def test_merge_list_shows_every_method(capsys):
    from loracombench.merging import METHODS

    assert main(["merge", "--list"]) == 0
    shown = capsys.readouterr().out
    assert all(f"{name}:" in shown for name in METHODS) and "reference:" in shown


@pytest.mark.parametrize("argv_tail, message", [
    (["--method", "nope"], "unknown"),
    (["--weights", "1"], "weights"),
    (["--param", "bogus=1"], "bogus"),
    (["--param", "novalue"], "key=value"),
    (["--method", "ties", "--param", "density=0.5", "--param", "density=0.3"], "--param density is given twice"),
    # finite weights whose merge overflows float32
    (["--method", "task_arithmetic", "--weights", "1e308", "1e308"], "overflows float32"),
    (["--method", "ties", "--param", "lam=1e308"], "overflows float32"),
])
def test_bad_merge_requests_write_nothing(tmp_path, two_adapters, capsys, argv_tail, message):
    out = tmp_path / "out"
    argv = ["merge", "--adapters", *map(str, two_adapters), "--out", str(out), *argv_tail]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("command", ["merge", "diagnose"])
def test_commands_that_read_no_data_still_never_write_into_the_data_mirror(tmp_path, two_adapters, capsys,
                                                                             monkeypatch, command):
    mirror = tmp_path / "mirror"
    (mirror / "ag_news").mkdir(parents=True)
    monkeypatch.setenv("LORACOMBENCH_DATA_DIR", str(mirror))
    argv = [command, "--adapters", *map(str, two_adapters), "--out", str(mirror / "ag_news" / "m")]
    assert main(argv) == 2
    assert "overlaps the input $LORACOMBENCH_DATA_DIR" in capsys.readouterr().err
    assert [p.name for p in mirror.rglob("*")] == ["ag_news"]


def test_merge_refuses_adapters_of_different_bases(tmp_path, capsys):
    llama = make_adapter(tmp_path / "llama", 1)
    other = make_adapter(tmp_path / "gpt2", 2, base="tiny-gpt2", targets=("c_attn",))
    assert main(["merge", "--adapters", str(llama), str(other), "--out", str(tmp_path / "m")]) == 2
    assert "different base models" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_merge_refuses_nan_factors_and_empty_list(tmp_path, two_adapters, capsys):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("adapter_config.json", "loracombench.json"):
        (broken / name).write_text((two_adapters[0] / name).read_text())
    tensors = load_file(two_adapters[0] / "adapter_model.safetensors")
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    assert main(["merge", "--adapters", str(broken), str(two_adapters[1]), "--out", str(tmp_path / "m")]) == 2
    assert "NaN" in capsys.readouterr().err and not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="empty"):
        adapters.merge_adapter_dirs([], "average", tmp_path / "m")


def test_plain_peft_adapters_without_metadata_are_accepted(tmp_path):
    a = make_adapter(tmp_path / "a", 1, with_metadata=False)
    b = make_adapter(tmp_path / "b", 2, with_metadata=False)
    assert adapters.read_adapter(a).metadata is None
    assert main(["merge", "--method", "task_arithmetic", "--adapters", str(a), str(b), "--out", str(tmp_path / "m")]) == 0
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 8  # ranks concatenate, scale folded into B


def test_different_target_modules_union_or_refusal(tmp_path, capsys):
    q_only = make_adapter(tmp_path / "q", 1, targets=("q_proj",))
    v_only = make_adapter(tmp_path / "v", 2, targets=("v_proj",))
    assert main(["merge", "--method", "average", "--adapters", str(q_only), str(v_only), "--out", str(tmp_path / "a")]) == 2
    assert "missing from adapter" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main(["merge", "--method", "task_arithmetic", "--adapters", str(q_only), str(v_only),
                 "--out", str(tmp_path / "u")]) == 0
    union = adapters.read_adapter(tmp_path / "u")
    q, v = adapters.read_adapter(q_only), adapters.read_adapter(v_only)
    assert set(union.factors) == set(q.factors) | set(v.factors)
    for module, factors in q.factors.items():
        torch.testing.assert_close(union.factors[module].delta_weight(), factors.delta_weight())


def test_diagnose_writes_json_and_plot(tmp_path, two_adapters):
    out = tmp_path / "diag"
    assert main(["diagnose", "--adapters", *map(str, two_adapters), "--out", str(out)]) == 0
    result = json.loads((out / "diagnostics.json").read_text())
    assert result["adapters"] == [str(p) for p in two_adapters]
    assert -1 <= result["overall"]["cosine"]["0-1"] <= 1 and 0 <= result["overall"]["sign_conflict"]["0-1"] <= 1
    assert (out / "diagnostics.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["diagnose", "--adapters", str(two_adapters[0]), "--out", str(tmp_path / "one")]) == 2


def test_diagnose_lists_the_modules_an_adapter_lacks_and_computes_over_the_shared_ones(tmp_path):
    qv = make_adapter(tmp_path / "qv", 1)
    q = make_adapter(tmp_path / "q", 2, targets=("q_proj",))
    out = tmp_path / "diag"
    assert main(["diagnose", "--adapters", str(qv), str(q), "--out", str(out)]) == 0
    result = json.loads((out / "diagnostics.json").read_text())
    v_modules = sorted(m for m in adapters.read_adapter(qv).factors if "v_proj" in m)
    assert v_modules and result["skipped_modules"] == v_modules
    assert sorted(result["modules"]) == sorted(adapters.read_adapter(q).factors)


def _dense_update(method: str, factors: list, module: str) -> torch.Tensor:
    """The method's merged ΔW from its dense definition, with no factor storage involved."""
    from loracombench.merging import METHODS, parse_params
    from loracombench.merging.dare import dropped_updates
    from loracombench.merging.dense import weighted_updates
    from loracombench.merging.ops import sign_consensus_mean, trim_by_magnitude
    from loracombench.merging.ties import ties_combine

    params = parse_params(METHODS[method], {})
    factors = [f.__class__(f.lora_A.double(), f.lora_B.double(), f.scale) for f in factors]
    if method == "ties":
        return params["lam"] * ties_combine(weighted_updates(factors, [1.0, 1.0]), params["density"], "sum")
    if method == "dare_ties":
        return sign_consensus_mean(dropped_updates(factors, [1.0, 1.0], params, module), "sum")
    return trim_by_magnitude(weighted_updates(factors, [1.0, 1.0]).sum(dim=0), params["density"])


@pytest.mark.parametrize("method", ["ties", "dare_ties", "magnitude_prune"])
def test_an_exact_dense_merge_on_the_base_gives_the_logits_of_base_plus_its_dense_update(tmp_path, two_adapters, method):
    out = tmp_path / method
    assert main(["merge", "--method", method, "--adapters", *map(str, two_adapters), "--out", str(out)]) == 0
    inputs = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        merged_logits = adapters.apply_adapter(load_model("tiny-llama"), out)(input_ids=inputs).logits
    sources = [adapters.read_adapter(p) for p in two_adapters]
    base = load_model("tiny-llama").model
    with torch.no_grad():
        for module in sources[0].factors:
            delta = _dense_update(method, [s.factors[module] for s in sources], module)
            assert torch.linalg.matrix_rank(delta) > 8  # beyond Σ rᵢ: a low-rank store would lose it
            base.get_submodule(module).weight += delta.to(torch.float32)
        expected = base(input_ids=inputs).logits
    torch.testing.assert_close(merged_logits, expected, atol=1e-5, rtol=1e-5)
