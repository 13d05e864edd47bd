"""One integration test on the real embedded SmolLM2-135M: train, merge, evaluate, a few examples each."""

from __future__ import annotations

import json

import pytest
from conftest import HAVE_MIRROR, MIRROR

from loracombench import adapters, metrics
from loracombench.cli import main

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not HAVE_MIRROR, reason=f"data mirror not found at {MIRROR}")]


def test_train_merge_evaluate_on_the_embedded_model(tmp_path):
    common = ["--data-dir", str(MIRROR)]
    for task, n in (("ag_news", 4), ("gsm8k", 2)):
        assert main(["train", "--task", task, "--n-train", str(n), "--epochs", "1", "--batch-size", "2",
                     "--max-length", "160", "--out", str(tmp_path / task), *common]) == 0
    assert main(["merge", "--method", "average", "--adapters", str(tmp_path / "ag_news"), str(tmp_path / "gsm8k"),
                 "--out", str(tmp_path / "merged")]) == 0

    from peft import PeftConfig

    for name in ("ag_news", "gsm8k", "merged"):
        config = PeftConfig.from_pretrained(str(tmp_path / name))
        assert config.peft_type == "LORA" and (tmp_path / name / "adapter_model.safetensors").is_file()
        meta = adapters.read_metadata(tmp_path / name)
        assert meta["base_model"]["name"] == "smollm2-135m"
        assert set(adapters.read_adapter(tmp_path / name).factors) == {
            f"model.layers.{i}.self_attn.{p}" for i in range(30) for p in ("q_proj", "v_proj")}
    curve = json.loads((tmp_path / "ag_news" / "loss_curve.json").read_text())
    assert len(curve) == 2 and all(0 < c["loss"] < 20 for c in curve)

    assert main(["eval", "--task", "ag_news", "--adapter", str(tmp_path / "merged"), "--n-eval", "4",
                 "--out", str(tmp_path / "eval_ag"), *common]) == 0
    assert main(["eval", "--task", "gsm8k", "--adapter", str(tmp_path / "merged"), "--n-eval", "2",
                 "--n-generate", "1", "--max-new-tokens", "24", "--out", str(tmp_path / "eval_gsm"), *common]) == 0
    ag = metrics.read_result(tmp_path / "eval_ag")["metrics"]
    gsm = metrics.read_result(tmp_path / "eval_gsm")["metrics"]
    assert 0 <= ag["accuracy"]["value"] <= 1 and 0 <= ag["macro_f1"]["value"] <= 1
    assert 0 <= gsm["exact_match_flexible"]["value"] <= 1 and gsm["exact_match_flexible"]["n"] == 1
    # A pretrained model finds the gold solutions far likelier than chance (ln 49152 ≈ 10.8 nats/token).
    assert 0 < gsm["gold_nll"]["value"] < 4
