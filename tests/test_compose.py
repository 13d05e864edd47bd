"""The composition layer: one shared base per process, folded adapters, routing, the registry."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from loracombench import adapters
from loracombench.compose import BuildInputs, RoutedAdapters, get_composition, register
from loracombench.compose.static_merge import StaticMerge
from loracombench.config import ExperimentConfig, TrainSettings
from loracombench.evaluation import EvalConfig, evaluate, evaluate_composed
from loracombench.models import load_model
from loracombench.tasks import get_task
from loracombench.training import train_adapter

AG_ROWS = [{"text": f"{w} story {i}", "label": y}
           for i in range(3) for y, w in enumerate(["war", "goal", "stocks", "chip"])]
GSM_ROWS = [{"question": f"What is {a} plus {b}?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
ROWS = {"ag_news": AG_ROWS, "gsm8k": GSM_ROWS}
SETTINGS = TrainSettings(epochs=1, batch_size=4, max_length=64, learning_rate=5e-2, checkpoint_every=0)


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    for task, rows in ROWS.items():
        train_adapter(load_model("tiny-llama"), get_task(task), rows, SETTINGS, root / task, progress=False)
    return {task: root / task for task in ROWS}


def logits(model):
    ids = torch.tensor([[5, 17, 42, 3, 99, 7, 64, 11]])
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_a_folded_adapter_scores_as_the_unfolded_peft_model_and_the_base_comes_back_exact(experts):
    shared = adapters.SharedBase(load_model("tiny-llama"))
    before = logits(shared.loaded.model)
    fresh = load_model("tiny-llama")
    reference = logits(adapters.apply_adapter(fresh, experts["ag_news"]))
    with shared.with_adapter(experts["ag_news"]) as model:
        folded = logits(model)
    assert not folded.equal(before)  # the adapter did something
    assert torch.allclose(folded, reference, atol=1e-5)
    assert logits(shared.loaded.model).equal(before)
    assert not any("lora" in name for name, _ in shared.loaded.model.named_modules())
    with shared.with_adapter(experts["ag_news"]) as model:  # a second use gives the same model
        assert logits(model).equal(folded)


def test_the_base_comes_back_bit_for_bit_from_a_snapshot_on_disk_not_a_copy_in_memory(tmp_path):
    """Whatever a borrower writes into the weights, they come back as loaded; the loaded bytes
    are held in a nameless file in the snapshot folder, not in a second copy in memory."""
    shared = adapters.SharedBase(load_model("tiny-llama"), snapshot_dir=tmp_path)
    loaded = {name: p.detach().clone() for name, p in load_model("tiny-llama").model.named_parameters()}
    snapshot = shared._snapshot
    assert not any(isinstance(v, torch.Tensor) for v in [*vars(shared).values(), *vars(snapshot).values()])
    assert list(tmp_path.iterdir()) == []  # unlinked: nothing to clean up, even after a kill
    assert snapshot.file.seek(0, 2) == sum(t.numel() * t.element_size() for t in loaded.values())
    with shared.borrowed() as borrowed:
        with torch.no_grad():
            for p in borrowed.model.parameters():
                p.mul_(-3.0).add_(1.0)
        get_peft_model(borrowed.model, LoraConfig(r=2, target_modules=["q_proj"]))
    restored = dict(shared.loaded.model.named_parameters())
    assert restored.keys() == loaded.keys()
    assert all(torch.equal(restored[name], value) for name, value in loaded.items())
    assert not any(p.requires_grad for p in restored.values())
    assert not any("lora" in name for name, _ in shared.loaded.model.named_modules())


def test_a_snapshot_folder_that_cannot_take_a_file_falls_back_to_the_temporary_folder(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the folder should be")
    shared = adapters.SharedBase(load_model("tiny-llama"), snapshot_dir=blocked)
    before = logits(shared.loaded.model)
    with shared.borrowed() as borrowed, torch.no_grad():
        next(borrowed.model.parameters()).add_(1.0)
    assert logits(shared.loaded.model).equal(before)


def test_a_borrower_that_replaces_a_weight_gets_one_clear_error(tmp_path):
    shared = adapters.SharedBase(load_model("tiny-llama"), snapshot_dir=tmp_path)
    name, _ = next(iter(shared.loaded.model.named_parameters()))
    with pytest.raises(RuntimeError, match=f"^the shared base's parameter {name} was replaced or reshaped"):
        with shared.borrowed() as borrowed:
            module_name, _, attribute = name.rpartition(".")
            setattr(borrowed.model.get_submodule(module_name), attribute, torch.nn.Parameter(torch.zeros(3)))


def test_training_on_the_shared_base_gives_the_same_adapter_as_on_a_fresh_base(experts, tmp_path):
    shared = adapters.SharedBase(load_model("tiny-llama"))
    with shared.with_adapter(experts["gsm8k"]):
        pass  # the shared base has been used before
    with shared.borrowed() as loaded:
        train_adapter(loaded, get_task("ag_news"), AG_ROWS, SETTINGS, tmp_path / "again", progress=False)
    name = adapters.WEIGHTS_FILE
    assert (tmp_path / "again" / name).read_bytes() == (experts["ag_news"] / name).read_bytes()


def test_oracle_routing_reproduces_each_expert_exactly(experts, tmp_path):
    oracle = get_composition("route_oracle")
    oracle.build(BuildInputs(experts=experts, seed=0), tmp_path)
    composed = oracle.load(tmp_path)
    shared = adapters.SharedBase(load_model("tiny-llama"))
    config = EvalConfig(n_eval=None, n_generate=2, max_new_tokens=8, batch_size=3)
    for task, rows in ROWS.items():
        routed = evaluate_composed(composed, shared, get_task(task), rows, config, {}, tmp_path / "routed" / task)
        with shared.with_adapter(experts[task]) as model:
            alone = evaluate(model, shared.loaded.tokenizer, get_task(task), rows, config, {}, tmp_path / "alone" / task)
        assert routed["metrics"]["routing_accuracy"]["value"] == 1.0
        routed_rows = [json.loads(line) for line in (tmp_path / "routed" / task / "predictions.jsonl").open()]
        alone_rows = [json.loads(line) for line in (tmp_path / "alone" / task / "predictions.jsonl").open()]
        assert [{k: v for k, v in r.items() if k != "route"} for r in routed_rows] == alone_rows
        assert {k: v for k, v in routed["metrics"].items() if k != "routing_accuracy"} == alone["metrics"]


def test_a_mixed_batch_routes_each_row_to_its_adapter(experts, tmp_path):
    """Rows of one task split between two adapters by a router: each row scores as its adapter alone."""
    picks = ["ag_news" if i % 3 else "gsm8k" for i in range(len(AG_ROWS))]
    by_prompt = {get_task("ag_news").prompt(row): pick for row, pick in zip(AG_ROWS, picks)}
    composed = RoutedAdapters(experts, lambda task, prompts: [by_prompt[p] for p in prompts])
    shared = adapters.SharedBase(load_model("tiny-llama"))
    config = EvalConfig(n_eval=None, n_generate=0, batch_size=5)
    task = get_task("ag_news")
    record = evaluate_composed(composed, shared, task, AG_ROWS, config, {}, tmp_path / "mixed")
    mixed = [json.loads(line) for line in (tmp_path / "mixed" / "predictions.jsonl").open()]
    assert [r["route"] for r in mixed] == picks
    assert record["details"]["routes"] == {"gsm8k": picks.count("gsm8k"), "ag_news": picks.count("ag_news")}
    for route in experts:
        with shared.with_adapter(experts[route]) as model:
            evaluate(model, shared.loaded.tokenizer, task, AG_ROWS, config, {}, tmp_path / route)
        alone = [json.loads(line) for line in (tmp_path / route / "predictions.jsonl").open()]
        for row, expected in zip(mixed, alone):
            if row["route"] == route:
                assert row["logprobs"] == expected["logprobs"] and row["index"] == expected["index"]


def test_a_static_merge_composition_is_the_merged_adapter(experts, tmp_path):
    merge = StaticMerge("task_arithmetic")
    merge.build(BuildInputs(experts=experts, seed=0), tmp_path)
    direct = tmp_path / "direct"
    adapters.merge_adapter_dirs(list(experts.values()), "task_arithmetic", direct)
    composed = merge.load(tmp_path)
    assert composed.adapter.is_dir()
    name = adapters.WEIGHTS_FILE
    assert (composed.adapter / name).read_bytes() == (direct / name).read_bytes()


def test_the_registry_and_the_config_refuse_unknown_compositions_and_parameters():
    with pytest.raises(ValueError, match="unknown composition 'route_psychic'; valid: .*route_oracle"):
        get_composition("route_psychic")
    with pytest.raises(ValueError, match="route_oracle.*takes no parameters"):
        get_composition("route_oracle", {"top_k": 2})
    with pytest.raises(ValueError, match="already registered"):
        register(type(get_composition("route_oracle")))
    with pytest.raises(ValueError, match="unknown composition"):
        ExperimentConfig(compositions=[{"method": "route_psychic"}])
    with pytest.raises(ValueError, match="labels repeat"):
        ExperimentConfig(merges=[{"method": "average", "label": "x"}], compositions=[{"method": "route_oracle",
                                                                                     "label": "x"}])
    assert ExperimentConfig(compositions=[{"method": "route_oracle"}]).compositions[0].name == "route_oracle"


def test_only_compositions_that_use_the_target_loss_key_on_its_version(monkeypatch):
    """LoraHub, LoRA Soups and multitask training read training.batch_loss_sum: a fix to that loss
    (TARGET_LOSS_VERSION) must change their cache keys, and nobody else's."""
    from loracombench import training
    from loracombench.compose import COMPOSITIONS

    required = {"static_merge": {"method": "ties"}, "weight_sweep": {"method": "ties"}}

    def keys():
        return {name: get_composition(name, required.get(name)).key() for name in COMPOSITIONS}

    before = keys()
    monkeypatch.setattr(training, "TARGET_LOSS_VERSION", training.TARGET_LOSS_VERSION + 1)
    after = keys()
    assert {name for name in COMPOSITIONS if after[name] != before[name]} == {"lorahub", "lora_soups", "multitask"}


def test_every_composition_that_takes_the_target_loss_names_its_batches():
    """scripts/lost_targets.py audits the loss through Composition.loss_batches."""
    from loracombench.compose import COMPOSITIONS
    from loracombench.compose.base import Composition

    takes = {name for name, kind in COMPOSITIONS.items() if kind.uses_target_loss}
    names = {name for name, kind in COMPOSITIONS.items() if kind.loss_batches is not Composition.loss_batches}
    assert takes == names == {"lorahub", "lora_soups", "multitask"}
    with pytest.raises(TypeError, match="Forgetful sets uses_target_loss, so it must define loss_batches"):
        type("Forgetful", (Composition,), {"uses_target_loss": True})
    with pytest.raises(ValueError, match="'route_oracle' trains on no target loss"):
        get_composition("route_oracle").loss_batches(None, None)
