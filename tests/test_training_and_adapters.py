"""LoRA training on tiny models, PEFT round trips, factor I/O and base-model checks."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import PeftModel

from loracombench import adapters
from loracombench.models import load_model
from loracombench.tasks import get_task
from loracombench.config import TrainSettings
from loracombench.training import IGNORE_INDEX, encode_example, init_lora, train_adapter

AG_ROWS = [{"text": f"{w} story {i}", "label": y}
           for i in range(3) for y, w in enumerate(["war", "goal", "stocks", "chip"])]


@pytest.mark.parametrize("task_name, eos", [("gsm8k", True), ("ag_news", False)])
def test_prompt_is_masked_and_only_generated_targets_end_with_eos(tiny_gpt2, task_name, eos):
    tok = tiny_gpt2.tokenizer
    task = get_task(task_name)
    row = {"question": "What is 2 plus 2?", "answer": "2+2=4\n#### 4"} if eos else AG_ROWS[0]
    assert task.target_ends_with_eos is eos
    example = encode_example(tok, task.prompt(row), task.target(row), 512, task.target_ends_with_eos)
    prompt_len = len(tok(task.prompt(row), add_special_tokens=False)["input_ids"])
    target_ids = tok(task.target(row), add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
    assert example.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert example.labels[prompt_len:] == target_ids
    assert example.input_ids[prompt_len:] == target_ids
    # Cut on the right; an example left with no target token is dropped.
    assert len(encode_example(tok, task.prompt(row), task.target(row), prompt_len + 1).input_ids) == prompt_len + 1
    assert encode_example(tok, task.prompt(row), task.target(row), max_length=prompt_len) is None


def _train(name, out, **overrides):
    loaded = load_model(name)
    config = TrainSettings(epochs=1, batch_size=4, max_length=64, learning_rate=5e-3, **overrides)
    meta = train_adapter(loaded, get_task("ag_news"), AG_ROWS, config, out, progress=False)
    return loaded, meta


@pytest.mark.parametrize("name, module, layer_type", [
    ("tiny-gpt2", "transformer.h.0.attn.c_attn", "Conv1D"),
    ("tiny-llama", "model.layers.0.self_attn.q_proj", "Linear"),
])
def test_lora_trains_and_round_trips_through_plain_peft(tmp_path, name, module, layer_type):
    loaded, meta = _train(name, tmp_path / "adapter", lora_alpha=8)  # alpha != r
    trained = loaded.model  # PEFT injected the trained LoRA layers into this instance
    lora_layer = dict(trained.named_modules())[module]
    assert type(lora_layer.base_layer).__name__ == layer_type
    assert lora_layer.lora_B["default"].weight.abs().sum() > 0, "training must move lora_B off zero"
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (layer_type == "Conv1D")
    assert meta["task"] == "ag_news" and meta["base_model"] == loaded.fingerprint
    assert meta["steps"] == 3 and meta["final_loss"] > 0
    assert (tmp_path / "adapter" / "loss_curve.png").stat().st_size > 1000
    # Plain PEFT, no loracombench code: same logits as the model that was trained.
    reloaded = PeftModel.from_pretrained(load_model(name).model, str(tmp_path / "adapter")).eval()
    ids = torch.tensor([[5, 17, 300, 42, 7, 99]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trained.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_read_adapter_scale_and_write_factors_preserve_delta_weight(tmp_path):
    _train("tiny-llama", tmp_path / "a", lora_alpha=8, r=4)
    adapter = adapters.read_adapter(tmp_path / "a")
    module = "model.layers.1.self_attn.v_proj"
    factors = adapter.factors[module]
    assert factors.scale == pytest.approx(8 / 4) and factors.rank == 4
    adapters.write_factors(tmp_path / "b", adapter.factors, adapter.config, {"kind": "copy"})
    copied = adapters.read_adapter(tmp_path / "b")
    torch.testing.assert_close(copied.factors[module].delta_weight(), factors.delta_weight())
    # and PEFT sees the same model through both folders
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        original = PeftModel.from_pretrained(load_model("tiny-llama").model, str(tmp_path / "a"))(ids).logits
        rewritten = PeftModel.from_pretrained(load_model("tiny-llama").model, str(tmp_path / "b"))(ids).logits
    torch.testing.assert_close(original, rewritten, rtol=1e-5, atol=1e-5)


def test_adapter_refuses_another_base(tmp_path):
    _train("tiny-llama", tmp_path / "llama")
    with pytest.raises(adapters.AdapterError, match="was made for base model tiny-llama"):
        adapters.apply_adapter(load_model("tiny-gpt2"), tmp_path / "llama")
    # A base with the same architecture but other weights is refused too.
    other = load_model("tiny-llama")
    with torch.no_grad():
        other.model.model.layers[0].mlp.up_proj.weight.add_(1.0)
    other.fingerprint = __import__("loracombench.models", fromlist=["fingerprint"]).fingerprint("tiny-llama", other.model)
    with pytest.raises(adapters.AdapterError, match="was made for base model"):
        adapters.apply_adapter(other, tmp_path / "llama")


def test_unreadable_adapters_are_refused(tmp_path):
    with pytest.raises(adapters.AdapterError, match="not a PEFT adapter folder"):
        adapters.read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(adapters.AdapterError, match="only safetensors"):
        adapters.read_adapter(tmp_path)


# The second row is shorter than the first one's solution, yet longer than half of it: a batch
# cut to the last (targets + 1) positions must still hold all of its targets.
GSM_ROWS = [{"question": "What is 1 plus 1?", "answer": "1+1=<<1+1=2>>2 and so " * 5 + "\n#### 2"},
            {"question": "Tom has 3 apples and buys 5 more. How many now?",
             "answer": "He has 3+5=<<3+5=8>>8 apples.\n#### 8"}]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("task_name, rows, max_length", [
    ("ag_news", [{"text": "a short one", "label": 1}, {"text": "a much longer article " * 5, "label": 3}], 128),
    ("gsm8k", GSM_ROWS, 128), ("gsm8k", GSM_ROWS, 45)])  # 45 cuts the first solution short
def test_left_padded_target_only_loss_equals_the_plain_loss(name, task_name, rows, max_length):
    """The training batch (left padding, logits for the last positions only) computes exactly the
    summed cross-entropy of the target tokens that one-example-at-a-time full logits give."""
    from loracombench.training import batch_loss_sum, collate

    loaded = load_model(name)
    task = get_task(task_name)
    examples = [encode_example(loaded.tokenizer, task.prompt(r), task.target(r), max_length, task.target_ends_with_eos)
                for r in rows]
    batch = collate(examples, loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        fast = batch_loss_sum(loaded.model, batch, torch.device("cpu")).item()
        plain = 0.0
        for e in examples:
            logits = loaded.model(torch.tensor([e.input_ids])).logits[0, :-1]
            plain += torch.nn.functional.cross_entropy(logits, torch.tensor(e.labels[1:]), ignore_index=IGNORE_INDEX,
                                                       reduction="sum").item()
    assert fast == pytest.approx(plain, rel=1e-5)
    n_targets = sum(label != IGNORE_INDEX for e in examples for label in e.labels)
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == n_targets  # every target is scored
    assert batch["logits_to_keep"] < batch["input_ids"].shape[1]  # the vocabulary projection is cut


def test_length_grouped_batches_cover_every_example_once():
    import random

    from loracombench.batching import length_grouped_batches

    lengths = [random.Random(i).randint(5, 90) for i in range(203)]
    batches = length_grouped_batches(lengths, 8, random.Random(0), group=4)
    assert sorted(i for b in batches for i in b) == list(range(203))
    assert batches == length_grouped_batches(lengths, 8, random.Random(0), group=4)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 40  # random batches of 8 from 5..90 spread about 65


def _initial_lora_A(task_name: str, **settings) -> dict[str, torch.Tensor]:
    model = init_lora(load_model("tiny-llama").model, TrainSettings(**settings), task_name)
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_A" in name}


def test_each_task_starts_from_its_own_lora_initialisation_unless_shared():
    ag_news, gsm8k = _initial_lora_A("ag_news"), _initial_lora_A("gsm8k")
    assert ag_news.keys() == gsm8k.keys() and ag_news
    assert all(not torch.equal(ag_news[name], gsm8k[name]) for name in ag_news)
    # The same task and seed reproduce the same start; another seed moves it.
    assert all(torch.equal(ag_news[name], a) for name, a in _initial_lora_A("ag_news").items())
    assert all(not torch.equal(ag_news[name], a) for name, a in _initial_lora_A("ag_news", seed=1).items())
    shared = [_initial_lora_A(task, shared_init=True) for task in ("ag_news", "gsm8k")]
    assert all(torch.equal(shared[0][name], shared[1][name]) for name in shared[0])


def test_a_target_after_a_prompt_ending_in_a_space_trains_on_the_tokens_of_running_text(tiny_gpt2):
    """As scoring splits it (evaluation.encode_pair): the space belongs to the target's first token."""
    tok = tiny_gpt2.tokenizer
    example = encode_example(tok, "Question: 2+2?\nAnswer: ", "It is 4.", 64)
    whole = tok("Question: 2+2?\nAnswer: It is 4.", add_special_tokens=False)["input_ids"]
    assert example.input_ids == whole + [tok.eos_token_id]
    prompt = tok("Question: 2+2?\nAnswer:", add_special_tokens=False)["input_ids"]
    assert example.labels == [IGNORE_INDEX] * len(prompt) + whole[len(prompt):] + [tok.eos_token_id]


def test_a_local_checkpoint_is_hashed_once_and_again_after_it_changes(tmp_path, monkeypatch):
    from loracombench import models

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    tiny = models.load_model("tiny-llama")
    folder = tmp_path / "checkpoint"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    hashed = []
    checksum = models.weight_checksum
    monkeypatch.setattr(models, "weight_checksum", lambda model: hashed.append(1) or checksum(model))

    first = models.load_model(str(folder)).fingerprint
    again = models.load_model(str(folder)).fingerprint
    assert len(hashed) == 1 and again == first
    assert first["weight_checksum"] == checksum(tiny.model)  # the cached value is the real one

    with torch.no_grad():
        tiny.model.lm_head.weight.add_(1.0)
    tiny.model.save_pretrained(folder)
    changed = models.load_model(str(folder)).fingerprint
    assert len(hashed) == 2 and changed["weight_checksum"] != first["weight_checksum"]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_gradient_checkpointing_recomputes_layers_and_trains_the_same_adapter(tmp_path, name):
    """Checkpointing only trades memory for time: with dropout on, the adapter is bit-identical,
    each layer's MLP runs twice per micro-batch (so it really was on), and the base is left
    without checkpointing for the evaluation that follows."""
    adapters_trained, forwards = {}, {}
    for checkpointed in (False, True):
        loaded = load_model(name)
        first_mlp = next(m for n, m in loaded.model.named_modules() if n.endswith(("h.0.mlp", "layers.0.mlp")))
        calls = []
        first_mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        config = TrainSettings(epochs=1, batch_size=4, max_length=64, learning_rate=5e-3, lora_dropout=0.2,
                               gradient_checkpointing=checkpointed)
        train_adapter(loaded, get_task("ag_news"), AG_ROWS, config, tmp_path / str(checkpointed), progress=False)
        adapters_trained[checkpointed] = adapters.read_weights(tmp_path / str(checkpointed))
        forwards[checkpointed] = len(calls)
        assert not loaded.model.is_activation_checkpointing and not getattr(loaded.model, "_require_grads_hooks", None)
    assert forwards == {False: 3, True: 6}  # 3 micro-batches
    assert adapters_trained[False].keys() == adapters_trained[True].keys()
    for key, weight in adapters_trained[False].items():
        assert torch.equal(weight, adapters_trained[True][key]), key
    assert TrainSettings(gradient_checkpointing=True).result_settings() == TrainSettings().result_settings()


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_recompute_above_tokens_recomputes_only_the_layers_a_large_batch_needs(tmp_path, name):
    """A micro-batch of t tokens recomputes the fewest layers k that leave (L - k) * t <= L * limit
    (its kept activations no more than `limit` tokens' worth), smaller batches none, and the
    adapter is bit-identical to one trained keeping every activation."""
    rows = [{"text": " ".join([w] * (1 + 4 * i)), "label": y} for i in range(4) for y, w in enumerate(["war", "goal"])]
    calls = {}

    def train(limit):
        loaded = load_model(name)
        layers = [m for n, m in loaded.model.named_modules() if n.endswith(("h.0.mlp", "h.1.mlp", "layers.0.mlp",
                                                                             "layers.1.mlp"))]
        runs = [[] for _ in layers]
        for index, mlp in enumerate(layers):
            mlp.register_forward_pre_hook(lambda *_, index=index: runs[index].append(1))
        tokens = []
        loaded.model.register_forward_pre_hook(lambda _, args, kwargs: tokens.append(kwargs["input_ids"].numel()),
                                               with_kwargs=True)
        config = TrainSettings(epochs=1, batch_size=3, max_length=64, learning_rate=5e-3, lora_dropout=0.2,
                               recompute_above_tokens=limit)
        train_adapter(loaded, get_task("ag_news"), rows, config, tmp_path / str(limit), progress=False)
        assert not loaded.model.is_activation_checkpointing and not getattr(loaded.model, "_require_grads_hooks", None)
        calls[limit] = [len(r) for r in runs]
        return adapters.read_weights(tmp_path / str(limit)), tokens

    kept_all, tokens = train(None)
    assert calls[None] == [len(tokens)] * 2
    limit = sorted(tokens)[len(tokens) // 2]
    recomputed, again = train(limit)
    assert again == tokens
    fewest = [min(k for k in range(3) if (2 - k) * t <= 2 * limit) for t in tokens]
    assert 0 < sum(fewest) < 2 * len(tokens)  # some batches recompute, some do not
    assert calls[limit] == [len(tokens) + sum(k >= 1 for k in fewest), len(tokens) + sum(k >= 2 for k in fewest)]
    assert kept_all.keys() == recomputed.keys()
    for key, weight in kept_all.items():
        assert torch.equal(weight, recomputed[key]), key
    assert TrainSettings(recompute_above_tokens=1).result_settings() == TrainSettings().result_settings()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_a_chunked_loss_projects_only_the_targets_and_gives_the_same_gradients(name, monkeypatch):
    """loss_chunk_tokens runs the decoder and projects the target positions onto the vocabulary a
    chunk at a time, recomputed in the backward pass; the loss and gradients are the model's own
    forward's up to float rounding. A model type outside PROJECTED_LOGITS takes its own forward."""
    from loracombench import training
    from loracombench.training import batch_loss_sum, collate, encode_rows

    loaded = load_model(name)
    model = init_lora(loaded.model, TrainSettings(r=4, lora_dropout=0.0), "gsm8k")
    torch.manual_seed(0)
    for parameter_name, parameter in model.named_parameters():
        if "lora_B" in parameter_name:
            torch.nn.init.normal_(parameter, std=0.1)  # zero at initialisation, which would hide lora_A's gradient
    examples = encode_rows(loaded.tokenizer, get_task("gsm8k"), GSM_ROWS, 64) + \
        encode_rows(loaded.tokenizer, get_task("ag_news"), AG_ROWS[:3], 64)
    batch = collate(examples, loaded.tokenizer.pad_token_id)
    projected = []
    loaded.model.get_output_embeddings().register_forward_pre_hook(lambda _, args: projected.append(tuple(args[0].shape[:-1])))

    def loss_and_gradients(chunk_tokens):
        model.zero_grad()
        loss = batch_loss_sum(model, batch, torch.device("cpu"), chunk_tokens=chunk_tokens)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full, full_gradients = loss_and_gradients(None)
    assert projected == [(len(examples), batch["logits_to_keep"])]  # the model's own forward: the whole slice
    projected.clear()
    chunked, chunked_gradients = loss_and_gradients(3)
    targets = int((batch["labels"] != IGNORE_INDEX).sum())
    sizes = [(3,)] * (targets // 3) + ([(targets % 3,)] if targets % 3 else [])
    # each chunk projected forward, then again in the backward pass (in its own order)
    assert projected[:len(sizes)] == sizes and sorted(projected[len(sizes):]) == sorted(sizes)
    assert chunked == pytest.approx(full, rel=1e-6) and chunked_gradients.keys() == full_gradients.keys()
    for key, gradient in chunked_gradients.items():
        assert gradient.abs().sum() > 0
        # float rounding: the products run on other shapes (about 1e-6 of the gradient's norm here)
        assert (gradient - full_gradients[key]).norm() <= 1e-5 * full_gradients[key].norm(), key
    with torch.no_grad():  # scoring only (no recompute): each chunk once
        projected.clear()
        assert batch_loss_sum(model, batch, torch.device("cpu"), chunk_tokens=3).item() == pytest.approx(full, rel=1e-6)
        assert projected == sizes
    monkeypatch.setattr(training, "PROJECTED_LOGITS", set())
    projected.clear()
    assert loss_and_gradients(3)[0] == full and projected == [(len(examples), batch["logits_to_keep"])]


def test_train_settings_take_the_chunked_loss_to_the_trainer(tmp_path):
    loaded = load_model("tiny-llama")
    shapes = []
    loaded.model.get_output_embeddings().register_forward_pre_hook(lambda _, args: shapes.append(args[0].dim()))
    settings = TrainSettings(epochs=1, batch_size=2, max_length=64, loss_chunk_tokens=2, checkpoint_every=0)
    meta = train_adapter(loaded, get_task("gsm8k"), GSM_ROWS, settings, tmp_path, progress=False)
    assert shapes and set(shapes) == {2} and meta["config"]["loss_chunk_tokens"] == 2


def test_an_unset_loss_chunk_keeps_the_cache_keys_and_a_set_one_changes_them():
    assert "loss_chunk_tokens" not in TrainSettings().result_settings()
    assert TrainSettings(loss_chunk_tokens=256).result_settings() != TrainSettings().result_settings()
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        TrainSettings(loss_chunk_tokens=0)


def test_a_saved_adapters_config_does_not_depend_on_the_process_string_hash(tmp_path):
    """PEFT writes target_modules in set order, which PYTHONHASHSEED changes; the same training
    saved in two processes must write the same adapter_config.json, whose digest downstream
    cache keys take."""
    import subprocess
    import sys

    code = ("import sys; from loracombench import training; from loracombench.config import TrainSettings; "
            "from loracombench.models import load_model; from loracombench.tasks import get_task; "
            "rows = [{'text': f'story {i}', 'label': i % 4} for i in range(4)]; "
            "training.train_adapter(load_model('tiny-llama'), get_task('ag_news'), rows, TrainSettings(r=2, "
            "epochs=1, batch_size=4, max_length=32, checkpoint_every=0), sys.argv[1], 'cpu', progress=False)")
    configs = []
    for seed in ("0", "3"):
        out = tmp_path / f"hashseed{seed}"
        child = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300,
                               env={**os.environ, "PYTHONHASHSEED": seed})
        assert child.returncode == 0, child.stderr[-2000:]
        configs.append((out / adapters.CONFIG_FILE).read_bytes())
    assert configs[0] == configs[1]
    assert json.loads(configs[0])["target_modules"] == sorted(json.loads(configs[0])["target_modules"])
