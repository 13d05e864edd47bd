"""Routing compositions: the TF-IDF classifier router (sequence level) and Arrow (token level)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from loracombench import adapters, metrics
from loracombench.compose import BuildInputs, OneModel, get_composition
from loracombench.compose.classifier_router import TfidfRouter
from loracombench.evaluation import EvalConfig, evaluate_composed
from loracombench.merging.factors import LoraFactors
from loracombench.models import load_model
from loracombench.tasks import get_task

AG_NEWS, GSM8K = get_task("ag_news"), get_task("gsm8k")
TOPICS = ["election minister war", "goal match season", "stocks profit market", "software internet chip"]
ITEMS = ["apples", "pencils", "marbles", "stickers", "books", "coins"]
IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 1024, 3]])


def news(n: int, offset: int = 0) -> list[dict]:
    return [{"text": f"{TOPICS[i % 4]} report {i + offset} from the capital", "label": i % 4} for i in range(n)]


def problems(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        a, b, item = i % 7 + 1, i % 5 + 2, ITEMS[i % len(ITEMS)]
        rows.append({"question": f"Sam has {a} {item} and gets {b} more. How many {item} does Sam have?",
                     "answer": f"Sam has {a} + {b} = {a + b} {item}.\n#### {a + b}"})
    return rows


def random_expert(folder, loaded, seed: int, rank: int = 4, modules=("q_proj", "v_proj")):
    """A PEFT adapter with random factors: experts that disagree, written in a second."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for name, module in loaded.model.named_modules():
        if name.endswith(modules):
            out_features, in_features = module.weight.shape if isinstance(module, torch.nn.Linear) else module.weight.shape[::-1]
            factors[name] = LoraFactors(torch.randn(rank, in_features, generator=generator),
                                        0.5 * torch.randn(out_features, rank, generator=generator))
    template = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": loaded.name,
                "fan_in_fan_out": loaded.model.config.model_type == "gpt2"}
    return adapters.write_factors(folder, factors, template, {"kind": "random", "base_model": loaded.fingerprint})


@pytest.fixture(scope="module")
def shared():
    return adapters.SharedBase(load_model("tiny-llama"))


@pytest.fixture(scope="module")
def experts(shared, tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    return {"ag_news": random_expert(root / "ag_news", shared.loaded, seed=1),
            "gsm8k": random_expert(root / "gsm8k", shared.loaded, seed=2)}


def built(name: str, params: dict, inputs: BuildInputs, folder):
    composition = get_composition(name, params)
    folder.mkdir()
    metadata = composition.build(inputs, folder)
    return composition.load(folder), metadata


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def predictions(composed, shared, task, rows, folder) -> list[dict]:
    evaluate_composed(composed, shared, task, rows, EvalConfig(n_generate=0), {"label": "x"}, folder, progress=False)
    return [{k: v for k, v in p.items() if k != "route"} for p in metrics.read_predictions(folder)]


# ---------------------------------------------------------------- route_classifier

@pytest.fixture(scope="module")
def classifier(experts, tmp_path_factory):
    inputs = BuildInputs(experts=experts, seed=0, train_rows={"ag_news": news(20), "gsm8k": problems(20)})
    return built("route_classifier", {}, inputs, tmp_path_factory.mktemp("built") / "route_classifier")


def test_classifier_router_routes_held_out_prompts_to_their_task(classifier, shared):
    composed, metadata = classifier
    held_out = {"ag_news": news(12, offset=100), "gsm8k": problems(12, offset=100)}
    for name, rows in held_out.items():
        task = get_task(name)
        assert composed.assign(task, [task.prompt(r) for r in rows], shared) == [name] * len(rows)
        assert composed.expected_route(task) == name
    assert metadata["n_prompts"] == {"ag_news": 20, "gsm8k": 20}
    assert metadata["cv_folds"] == 5 and metadata["cv_accuracy"] == 1.0
    assert metadata["cv_accuracy_per_task"] == {"ag_news": 1.0, "gsm8k": 1.0}
    assert get_composition("route_classifier").needs().router_training


def test_classifier_routes_ignore_the_task_argument_and_each_prompt_is_decided_alone(classifier, shared):
    composed, _ = classifier
    stream = [AG_NEWS.prompt(r) for r in news(6, 50)] + [GSM8K.prompt(r) for r in problems(6, 50)]
    random.Random(0).shuffle(stream)
    routes = composed.assign(None, stream, shared)
    assert set(routes) == {"ag_news", "gsm8k"}
    for task in (AG_NEWS, GSM8K, object()):
        assert composed.assign(task, stream, shared) == routes
    assert [composed.assign(None, [prompt], shared)[0] for prompt in stream] == routes
    order = list(range(len(stream)))
    random.Random(1).shuffle(order)
    assert composed.assign(None, [stream[i] for i in order], shared) == [routes[i] for i in order]


def test_stored_router_scores_exactly_as_fitted_and_no_file_is_a_pickle(tmp_path):
    prompts = [AG_NEWS.prompt(r) for r in news(10)] + [GSM8K.prompt(r) for r in problems(10)]
    fitted = TfidfRouter.fit(prompts, ["ag_news"] * 10 + ["gsm8k"] * 10, C=0.5)
    fitted.save(tmp_path)
    loaded = TfidfRouter.load(tmp_path)
    held_out = [AG_NEWS.prompt(r) for r in news(5, 30)] + [GSM8K.prompt(r) for r in problems(5, 30)]
    assert np.array_equal(loaded.scores(held_out), fitted.scores(held_out))
    assert loaded.routes(held_out) == ["ag_news"] * 5 + ["gsm8k"] * 5
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".safetensors"}


def test_classifier_routing_scores_each_task_exactly_as_its_expert(classifier, experts, shared, tmp_path):
    composed, _ = classifier
    before = logits(shared.loaded.model)
    for task, rows in ((AG_NEWS, news(8, 200)), (GSM8K, problems(4, 200))):
        routed = predictions(composed, shared, task, rows, tmp_path / task.name)
        record = metrics.read_result(tmp_path / task.name)
        assert record["metrics"]["routing_accuracy"]["value"] == 1.0
        assert routed == predictions(OneModel(experts[task.name]), shared, task, rows, tmp_path / f"{task.name}-expert")
        other = next(name for name in experts if name != task.name)
        assert routed != predictions(OneModel(experts[other]), shared, task, rows, tmp_path / f"{task.name}-other")
    assert torch.equal(logits(shared.loaded.model), before)


@pytest.mark.parametrize("params, message", [
    ({"C": 0}, "C .* must be a finite number > 0, got 0"),
    ({"C": math.inf}, "C .* got inf"),
    ({"cv_folds": 1}, "cv_folds must be an integer >= 2, got 1"),
    ({"cv_folds": 2.0}, "cv_folds must be an integer >= 2, got 2.0"),
    ({"folds": 3}, r"unknown parameter\(s\) \['folds'\]; valid: \['C', 'cv_folds'\]"),
])
def test_classifier_bad_parameters_give_one_clear_error(params, message):
    with pytest.raises(ValueError, match=message):
        get_composition("route_classifier", params)


def test_classifier_refuses_one_expert_and_a_task_without_training_rows(experts, tmp_path):
    composition = get_composition("route_classifier")
    one = BuildInputs(experts={"ag_news": experts["ag_news"]}, seed=0, train_rows={"ag_news": news(8)})
    with pytest.raises(ValueError, match=r"at least two experts, got \['ag_news'\]"):
        composition.build(one, tmp_path)
    unlabelled = BuildInputs(experts=experts, seed=0, train_rows={"ag_news": news(8), "gsm8k": problems(1)})
    with pytest.raises(ValueError, match=r"fewer than 2 training rows for task\(s\) \['gsm8k'\]"):
        composition.build(unlabelled, tmp_path)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- route_arrow

def arrow(experts: dict, folder, **params):
    composed, _ = built("route_arrow", params, BuildInputs(experts=experts, seed=0), folder)
    return composed


def arrow_logits(composed, shared) -> torch.Tensor:
    with composed.open("model", shared) as model:
        return logits(model)


def test_arrow_runs_end_to_end_and_leaves_the_base_exactly_as_it_was(experts, shared, tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    composed = arrow(experts, tmp_path / "arrow")
    model = shared.loaded.model
    before, weights = logits(model), {n: p.clone() for n, p in model.named_parameters()}
    rows = news(8, 300)
    first = predictions(composed, shared, AG_NEWS, rows, tmp_path / "first")
    assert composed.assign(None, [AG_NEWS.prompt(r) for r in rows], shared) == ["model"] * 8
    assert torch.equal(logits(model), before)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules()) and not hasattr(model, "peft_config")
    # a second build on the same base routes identically (the prototypes' power iteration is seeded)
    assert predictions(composed, shared, AG_NEWS, rows, tmp_path / "second") == first
    assert first != predictions(OneModel(None), shared, AG_NEWS, rows, tmp_path / "base")


@pytest.mark.parametrize("name, modules", [("tiny-llama", ("q_proj", "v_proj")), ("tiny-gpt2", ("c_attn",))])
def test_arrow_over_one_expert_is_that_expert_whatever_the_temperature(tmp_path, name, modules):
    shared = adapters.SharedBase(load_model(name))
    expert = random_expert(tmp_path / "expert", shared.loaded, seed=3, modules=modules)
    with shared.with_adapter(expert) as model:
        alone = logits(model)
    for temperature in (0.2, 5.0):  # top_k 3 (PEFT's default) is cut to the one expert
        routed = arrow_logits(arrow({"a": expert}, tmp_path / f"t{temperature}", temperature=temperature), shared)
        torch.testing.assert_close(routed, alone, rtol=1e-5, atol=1e-5)


def test_arrow_over_copies_of_one_expert_is_that_expert(experts, shared, tmp_path):
    with shared.with_adapter(experts["gsm8k"]) as model:
        alone = logits(model)
    copies = {"first": experts["gsm8k"], "second": experts["gsm8k"]}
    routed = arrow_logits(arrow(copies, tmp_path / "copies", top_k=2, temperature=0.3), shared)
    torch.testing.assert_close(routed, alone, rtol=1e-5, atol=1e-5)  # a convex mix of equal updates


def test_arrow_top1_gives_each_token_the_whole_update_of_the_expert_its_input_aligns_with(experts, shared, tmp_path):
    composed = arrow(experts, tmp_path / "top1", top_k=1)
    captured = {}
    with composed.open("model", shared) as model:
        layer = model.get_submodule("base_model.model.model.layers.1.self_attn.v_proj")
        hook = layer.register_forward_hook(lambda module, args, out: captured.update(x=args[0][0], out=out[0]))
        logits(model)
        hook.remove()
        with torch.no_grad():
            delta = captured["out"] - layer.base_layer(captured["x"])
            names = ["task_0", "task_1"]
            updates = torch.stack([layer.scaling[n] * layer.lora_B[n].weight @ layer.lora_A[n].weight for n in names])
    # Arrow's prototype: the top right singular vector of each expert's update
    prototypes = torch.stack([torch.linalg.svd(u)[2][0] for u in updates])
    chosen = (captured["x"] @ prototypes.T).abs().argmax(dim=1)
    assert set(chosen.tolist()) == {0, 1}, "the fixture should send tokens to both experts"
    expected = torch.stack([updates[e] @ x for e, x in zip(chosen, captured["x"])])
    torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-4)


def test_arrow_temperature_matters_only_when_experts_are_mixed(experts, shared, tmp_path):
    def routed(top_k, temperature):
        return arrow_logits(arrow(experts, tmp_path / f"{top_k}-{temperature}", top_k=top_k, temperature=temperature),
                            shared)

    assert torch.equal(routed(1, 0.1), routed(1, 10.0))
    assert not torch.allclose(routed(2, 0.1), routed(2, 10.0), atol=1e-3)


@pytest.mark.parametrize("params, message", [
    ({"top_k": 0}, "top_k must be an integer >= 1 .*got 0; PEFT's default 3"),
    ({"top_k": 1.5}, "top_k must be an integer >= 1 .*got 1.5"),
    ({"top_k": True}, "top_k must be an integer >= 1 .*got True"),
    ({"temperature": 0}, "temperature must be a finite number > 0, got 0; PEFT's default 1.0"),
    ({"temperature": -1.0}, "temperature must be a finite number > 0, got -1.0"),
    ({"temperature": math.nan}, "temperature must be a finite number > 0, got nan"),
    ({"temperature": "hot"}, "temperature must be a finite number > 0, got 'hot'"),
    ({"use_gks": True}, r"unknown parameter\(s\) \['use_gks'\]; valid: \['temperature', 'top_k'\]"),
])
def test_arrow_bad_parameters_give_one_clear_error(params, message):
    with pytest.raises(ValueError, match=message):
        get_composition("route_arrow", params)


def test_arrow_refuses_experts_it_cannot_stack(experts, shared, tmp_path):
    composition = get_composition("route_arrow")
    rank8 = random_expert(tmp_path / "rank8", shared.loaded, seed=4, rank=8)
    with pytest.raises(ValueError, match=r"ag_news and wide differ in rank at .*q_proj \(4 vs 8\)"):
        composition.build(BuildInputs(experts={"ag_news": experts["ag_news"], "wide": rank8}, seed=0), tmp_path)
    q_only = random_expert(tmp_path / "q_only", shared.loaded, seed=5, modules=("q_proj",))
    with pytest.raises(ValueError, match=r"ag_news and q_only adapt different modules \(e.g. .*v_proj\)"):
        composition.build(BuildInputs(experts={"ag_news": experts["ag_news"], "q_only": q_only}, seed=0), tmp_path)
    with pytest.raises(ValueError, match="needs at least one expert"):
        composition.build(BuildInputs(experts={}, seed=0), tmp_path)


# ---------------------------------------------------------------- route_arrow_sequence

def sequence_router(experts: dict, folder):
    return built("route_arrow_sequence", {}, BuildInputs(experts=experts, seed=0), folder)


def base_inputs(shared, modules, prompt) -> dict[str, torch.Tensor]:
    """Each module's input on the base model, captured by the test's own hooks."""
    captured = {}
    model = shared.loaded.model
    hooks = [model.get_submodule(m).register_forward_hook(lambda mod, args, out, m=m: captured.update({m: args[0][0]}))
             for m in modules]
    with torch.no_grad():
        model(torch.tensor([shared.loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]]))
    for hook in hooks:
        hook.remove()
    return captured


def test_arrow_sequence_votes_are_top1_arrow_choices_of_the_dense_updates(experts, shared, tmp_path):
    composed, metadata = sequence_router(experts, tmp_path / "seq")
    read = {task: adapters.read_adapter(path) for task, path in experts.items()}
    modules = sorted(read["ag_news"].factors)
    assert metadata["modules"] == len(modules) and metadata["modules_without_update"] == {"ag_news": 0, "gsm8k": 0}
    # the prototype is the top right singular vector of the dense update, up to its sign
    dense = {m: [torch.linalg.svd(read[t].factors[m].delta_weight().double())[2][0].float() for t in read]
             for m in modules}
    for m in modules:
        for stored, expected in zip(composed.prototypes[m], dense[m]):
            torch.testing.assert_close(stored.abs(), expected.abs(), rtol=1e-4, atol=1e-5)
    stream = [AG_NEWS.prompt(r) for r in news(3, 400)] + [GSM8K.prompt(r) for r in problems(3, 400)]
    routes = []
    for prompt in stream:
        inputs = base_inputs(shared, modules, prompt)
        counts = torch.zeros(2, dtype=torch.long)
        for m in modules:
            counts += torch.bincount((inputs[m] @ torch.stack(dense[m]).T).abs().argmax(1), minlength=2)
        assert torch.equal(composed.vote(shared.loaded, prompt), counts)
        assert counts.sum() == len(modules) * inputs[modules[0]].shape[0]  # one vote per token and layer
        routes.append(["ag_news", "gsm8k"][int(counts.argmax())])
    assert composed.assign(None, stream, shared) == routes


def test_arrow_sequence_decides_each_prompt_alone_and_leaves_the_base_as_it_was(experts, shared, tmp_path):
    composed, _ = sequence_router(experts, tmp_path / "seq")
    model = shared.loaded.model
    before = logits(model)
    stream = [AG_NEWS.prompt(r) for r in news(5, 500)] + [GSM8K.prompt(r) for r in problems(5, 500)]
    random.Random(2).shuffle(stream)
    routes = composed.assign(None, stream, shared)
    assert set(routes) == {"ag_news", "gsm8k"}, "the fixture should route prompts to both experts"
    for task in (AG_NEWS, GSM8K):
        assert composed.assign(task, stream, shared) == routes
    assert [composed.assign(None, [prompt], shared)[0] for prompt in stream] == routes
    assert composed.assign(None, stream[::-1], shared) == routes[::-1]
    assert torch.equal(logits(model), before)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_arrow_sequence_scores_each_row_exactly_as_the_expert_it_routes_to(experts, shared, tmp_path):
    composed, _ = sequence_router(experts, tmp_path / "seq")
    rows = news(12, 600)
    routes = composed.assign(AG_NEWS, [AG_NEWS.prompt(r) for r in rows], shared)
    assert set(routes) == {"ag_news", "gsm8k"}
    routed = predictions(composed, shared, AG_NEWS, rows, tmp_path / "routed")
    record = metrics.read_result(tmp_path / "routed")
    assert record["metrics"]["routing_accuracy"]["value"] == routes.count("ag_news") / len(rows)
    for expert in ("ag_news", "gsm8k"):
        picked = [i for i, route in enumerate(routes) if route == expert]
        alone = predictions(OneModel(experts[expert]), shared, AG_NEWS, [rows[i] for i in picked], tmp_path / expert)
        assert [routed[i] for i in picked] == [{**p, "index": i} for p, i in zip(alone, picked)]


def test_arrow_sequence_ties_go_to_the_first_expert_and_a_silent_module_never_votes(experts, shared, tmp_path):
    copies, _ = sequence_router({"first": experts["gsm8k"], "second": experts["gsm8k"]}, tmp_path / "copies")
    stream = [AG_NEWS.prompt(r) for r in news(3, 700)] + [GSM8K.prompt(r) for r in problems(3, 700)]
    assert copies.assign(None, stream, shared) == ["first"] * 6
    assert copies.vote(shared.loaded, stream[0])[1] == 0  # every token's tie went to the first
    read = adapters.read_adapter(experts["ag_news"])
    silent_factors = {m: LoraFactors(f.lora_A, torch.zeros_like(f.lora_B)) if "layers.0." in m else f
                      for m, f in read.factors.items()}
    template = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": shared.loaded.name}
    silent = adapters.write_factors(tmp_path / "silent", silent_factors, template,
                                    {"kind": "random", "base_model": shared.loaded.fingerprint})
    composed, metadata = sequence_router({"gsm8k": experts["gsm8k"], "silent": silent}, tmp_path / "with_silent")
    assert metadata["modules_without_update"] == {"gsm8k": 0, "silent": 2}
    layer0 = [m for m in composed.prototypes if "layers.0." in m]
    assert all(not composed.prototypes[m][1].any() for m in layer0)


def test_arrow_sequence_declares_its_pass_and_refuses_what_it_cannot_route(experts, shared, tmp_path):
    composition = get_composition("route_arrow_sequence")
    assert composition.needs().routing_forward and composition.needs().summary() == "a base pass per prompt"
    with pytest.raises(ValueError, match=r"takes no parameters, got \['top_k'\]"):
        get_composition("route_arrow_sequence", {"top_k": 1})
    with pytest.raises(ValueError, match=r"at least two experts, got \['ag_news'\]"):
        composition.build(BuildInputs(experts={"ag_news": experts["ag_news"]}, seed=0), tmp_path)
    q_only = random_expert(tmp_path / "q_only", shared.loaded, seed=5, modules=("q_proj",))
    with pytest.raises(ValueError, match=r"ag_news and q_only adapt different modules"):
        composition.build(BuildInputs(experts={"ag_news": experts["ag_news"], "q_only": q_only}, seed=0), tmp_path)
    # unlike PEFT's Arrow it compares one vector per expert, so the ranks may differ
    rank8 = random_expert(tmp_path / "rank8", shared.loaded, seed=4, rank=8)
    (tmp_path / "mixed").mkdir()
    composition.build(BuildInputs(experts={"ag_news": experts["ag_news"], "wide": rank8}, seed=0), tmp_path / "mixed")
    assert len(composition.load(tmp_path / "mixed").assign(None, [AG_NEWS.prompt(news(1)[0])], shared)) == 1
    settings = tmp_path / "mixed" / "arrow_sequence.json"
    settings.write_text(settings.read_text().replace('"wide"', '"narrow"'))
    expected = r"names the experts \['ag_news', 'narrow'\], experts.json \['ag_news', 'wide'\]"
    with pytest.raises(ValueError, match=expected):
        composition.load(tmp_path / "mixed")


def test_a_module_no_expert_changes_casts_no_vote():
    """Every prototype zero: its logits tie at zero for every token, and argmax alone would give
    them all to the first expert. Only the module the experts do change votes."""
    from loracombench.compose.arrow_sequence_router import votes

    inputs = {"changed": torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]]), "unchanged": torch.ones(3, 2)}
    prototypes = {"changed": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "unchanged": torch.zeros(2, 2)}
    assert votes(inputs, prototypes).tolist() == [1, 2]
    assert votes({"unchanged": inputs["unchanged"]}, {"unchanged": prototypes["unchanged"]}).tolist() == [0, 0]
