"""LoRA Soups (CAT): trained per-module weights over concatenated experts, on tiny-llama.

Laws: at equal initial weights CAT is task arithmetic with those weights; training lowers the loss
on its examples and changes nothing but α; the saved adapter is the trained model exactly; the
seed decides α; the shared base comes back untouched."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from loracombench import adapters
from loracombench.compose import BuildInputs, get_composition
from loracombench.compose.lora_soups import ADAPTER_DIR, LOSS_CURVE_FILE, WEIGHTS_FILE, ConcatenatedExperts, train_weights
from loracombench.config import TrainSettings
from loracombench.evaluation import EvalConfig, evaluate_composed
from loracombench.io import read_json
from loracombench.models import load_model
from loracombench.tasks import get_task
from loracombench.training import batch_loss_sum, collate

from conftest import TOPICS

PROMPTS = ["Classify the news article: goal match season\nTopic:", "Tom has 3 apples and buys 4 more."]


def write_expert(path, task: str, seed: int, r: int = 4):
    """A saved tiny-llama adapter with random A and B (PEFT's own format and metadata)."""
    loaded = load_model("tiny-llama")
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(loaded.model, config)
    model.peft_config["default"].base_model_name_or_path = loaded.path
    adapters.save_peft_model(model, path, {"kind": "trained", "task": task, "base_model": loaded.fingerprint})
    return path


def validation_rows(n: int = 8) -> dict[str, list[dict]]:
    return {"ag_news": [{"text": f"{TOPICS[i % 4]} story {i}", "label": i % 4} for i in range(n)],
            "gsm8k": [{"question": f"Tom has {i} apples and buys 2 more. How many?",
                       "answer": f"He has {i} + 2 = {i + 2}.\n#### {i + 2}"} for i in range(n)]}


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    return {"ag_news": write_expert(root / "ag_news", "ag_news", 1), "gsm8k": write_expert(root / "gsm8k", "gsm8k", 2)}


@pytest.fixture
def shared():
    return adapters.SharedBase(load_model("tiny-llama"))


def inputs_for(experts, shared, seed=0) -> BuildInputs:
    return BuildInputs(experts=dict(experts), seed=seed, borrow_base=shared.borrowed, validation=validation_rows())


def logits(model, prompts=PROMPTS) -> torch.Tensor:
    tokenizer = shared_tokenizer()
    with torch.no_grad():
        return torch.cat([model(**tokenizer(p, return_tensors="pt")).logits[0] for p in prompts])


def shared_tokenizer():
    from loracombench.models import tiny_tokenizer

    return tiny_tokenizer()


def mean_loss(model, examples, pad_id) -> float:
    n_target = sum(sum(label != -100 for label in e.labels) for e in examples)
    with torch.no_grad():
        return float(batch_loss_sum(model, collate(examples, pad_id), torch.device("cpu"))) / n_target


def read_experts(experts) -> dict:
    return {task: adapters.read_adapter(path) for task, path in experts.items()}


@pytest.mark.parametrize("weighting, alpha", [("softmax", 0.5), ("free", 1.0)])
def test_equal_initial_weights_give_task_arithmetic_with_those_weights(experts, shared, tmp_path, weighting, alpha):
    cat = ConcatenatedExperts(read_experts(experts), weighting)
    assert all(w == {"ag_news": alpha, "gsm8k": alpha} for w in cat.weights().values())
    with cat.attached(shared.loaded.model) as model:
        soup = logits(model)
    adapters.merge_adapter_dirs(list(experts.values()), "task_arithmetic", tmp_path / "ta", weights=[alpha, alpha])
    with shared.with_adapter(tmp_path / "ta") as model:
        merged = logits(model)
    with shared.with_adapter(experts["ag_news"]) as model:
        assert not torch.allclose(logits(model), merged, atol=1e-3)  # the comparison can tell models apart
    torch.testing.assert_close(soup, merged, rtol=1e-5, atol=1e-5)


def test_training_lowers_the_loss_and_changes_only_alpha(experts, shared):
    soups = get_composition("lora_soups", {"epochs": 3, "batch_size": 4, "learning_rate": 0.1})
    loaded = shared.loaded
    examples, used = soups.examples(inputs_for(experts, shared), loaded.tokenizer)
    assert used == {"ag_news": 8, "gsm8k": 8}
    cat = ConcatenatedExperts(read_experts(experts))
    factors = {name: buffer.clone() for name, buffer in cat.named_buffers()}
    base = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    with cat.attached(loaded.model) as model:
        before = mean_loss(model, examples, loaded.tokenizer.pad_token_id)
    settings = TrainSettings(seed=0, epochs=3, batch_size=4, learning_rate=0.1, group_by_length=False)
    curve = train_weights(cat, loaded.model, examples, settings, loaded.tokenizer.pad_token_id)
    with cat.attached(loaded.model) as model:
        after = mean_loss(model, examples, loaded.tokenizer.pad_token_id)
    assert len(curve) == 3 * 4 and after < before - 1e-3
    assert any(abs(a - 0.5) > 1e-3 for w in cat.weights().values() for a in w.values())
    assert all(torch.equal(buffer, factors[name]) for name, buffer in cat.named_buffers())
    assert all(torch.equal(p, base[name]) and p.grad is None for name, p in loaded.model.named_parameters())
    assert not any(m._forward_hooks for m in loaded.model.modules())  # the hooks went with the block


def test_saved_adapter_is_the_trained_model(experts, shared, tmp_path):
    soups = get_composition("lora_soups", {"epochs": 2, "batch_size": 4, "learning_rate": 0.1})
    fitted = soups.fit(inputs_for(experts, shared))
    soups.write(fitted, tmp_path)
    with fitted.cat.attached(shared.loaded.model) as model:
        trained = logits(model)
    composed = soups.load(tmp_path)
    with composed.open(composed.assign(get_task("ag_news"), PROMPTS[:1], shared)[0], shared) as model:
        torch.testing.assert_close(logits(model), trained, rtol=1e-5, atol=1e-5)
    # Folded factors: Σᵢ αᵢ·sᵢ·BᵢAᵢ per module, with the α saved beside them.
    weights, saved = read_json(tmp_path / WEIGHTS_FILE), adapters.read_adapter(tmp_path / ADAPTER_DIR)
    sources = read_experts(experts)
    for module, by_task in weights.items():
        expected = sum(alpha * sources[task].factors[module].delta_weight() for task, alpha in by_task.items())
        torch.testing.assert_close(saved.factors[module].delta_weight(), expected, rtol=1e-5, atol=1e-6)
    assert len(read_json(tmp_path / LOSS_CURVE_FILE)) == fitted.info["steps"] == 2 * 4


def test_the_seed_decides_the_weights(experts, shared):
    def weights(run_seed, **params):
        soups = get_composition("lora_soups", {"epochs": 1, "batch_size": 4, "learning_rate": 0.1, **params})
        return soups.fit(inputs_for(experts, shared, run_seed)).cat.weights()

    assert weights(0) == weights(0) and weights(0) != weights(1)  # the shuffle order is the seed's
    assert weights(0, seed=1) == weights(1)  # the parameter overrides the run seed
    assert weights(3, init="random") != weights(4, init="random")


@pytest.mark.parametrize("params, culprit", [
    ({"epochs": 0}, "epochs must be an integer >= 1"),
    ({"n_validation": 2.5}, "n_validation must be an integer >= 1"),
    ({"learning_rate": float("nan")}, "learning_rate must be a finite number > 0"),
    ({"batch_size": True}, "batch_size must be an integer >= 1"),
    ({"max_length": 4}, "max_length must be an integer >= 8 or null"),
    ({"seed": -1}, "seed must be an integer from 0 to 4294967295 or null"),
    ({"seed": 2**32}, "seed must be an integer from 0 to 4294967295 or null"),
    ({"weighting": "sigmoid"}, "unknown weighting 'sigmoid'; valid: softmax, free"),
    ({"init": "zeros"}, "unknown init 'zeros'; valid: equal, random"),
    ({"init": "random", "weighting": "free"}, "needs weighting 'softmax'"),
    ({"lr": 0.1}, "unknown parameter(s) ['lr']; valid:"),
])
def test_bad_parameters_give_one_clear_error(params, culprit):
    with pytest.raises(ValueError) as error:
        get_composition("lora_soups", params)
    assert culprit in str(error.value) and "\n" not in str(error.value)


def test_missing_validation_rows_of_a_task_are_named(experts, shared, tmp_path):
    inputs = inputs_for(experts, shared)
    inputs.validation = {"ag_news": inputs.validation["ag_news"]}
    with pytest.raises(ValueError, match="none for 'gsm8k'"):
        get_composition("lora_soups").build(inputs, tmp_path)


def test_build_load_and_evaluate_on_the_shared_base(experts, shared, tmp_path):
    soups = get_composition("lora_soups", {"n_validation": 6, "epochs": 1, "batch_size": 4})
    assert soups.needs().validation_per_task == 6 and soups.needs().gradients
    pristine = {name: p.detach().clone() for name, p in shared.loaded.model.named_parameters()}
    metadata = soups.build(inputs_for(experts, shared), tmp_path)
    assert metadata["info"]["n_examples"] == {"ag_news": 6, "gsm8k": 6} and metadata["info"]["steps"] == 3
    composed = soups.load(tmp_path)
    for task_name, rows in validation_rows(4).items():
        task = get_task(task_name)
        record = evaluate_composed(composed, shared, task, rows, EvalConfig(n_generate=0, batch_size=4),
                                   {"label": "lora_soups"}, progress=False)
        assert record["n"] == 4 and record["metrics"]
    model = shared.loaded.model
    assert all(torch.equal(p, pristine[name]) for name, p in model.named_parameters())
    assert not any(m._forward_hooks for m in model.modules())
    assert adapters.read_adapter(tmp_path / ADAPTER_DIR).metadata["method"] == "lora_soups"


def test_the_audited_loss_batches_are_the_batches_trained_on(experts, shared, monkeypatch):
    """LoraSoups.loss_batches (scripts/lost_targets.py) names the micro-batches of its training."""
    from loracombench import training

    trained, step = [], training.Trainer.step
    monkeypatch.setattr(training.Trainer, "step", lambda self, micro: trained.extend(micro) or step(self, micro))
    composition, inputs = get_composition("lora_soups", {"n_validation": 5}), inputs_for(experts, shared, seed=3)
    composition.fit(inputs)
    assert trained and trained == composition.loss_batches(inputs, shared.loaded.tokenizer)
