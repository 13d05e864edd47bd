"""Scoring, generation, metrics and confidence intervals."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from loracombench import metrics
from loracombench.batching import left_pad
from loracombench.evaluation import (MIN_SHARED_PREFIX, EvalConfig, continuation_logprobs, cut_at_stop, encode,
                                     encode_pair, evaluate, generate, greedy_tokens, score_choices, shared_prefix)
from loracombench.tasks import get_task


def reference_logprob(model, context, continuation):
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([context + continuation])).logits[0, :-1], -1)
    return sum(logprobs[len(context) - 1 + j, t].item() for j, t in enumerate(continuation))


def test_batched_left_padded_scoring_equals_one_at_a_time(tiny_gpt2):
    model, tok = tiny_gpt2.model, tiny_gpt2.tokenizer
    task = get_task("ag_news")
    rows = [{"text": "Short one", "label": 0}, {"text": "A much longer article about markets " * 4, "label": 2}]
    requests = [(encode(tok, task.prompt(r)), encode(tok, " " + c)) for r in rows for c in task.choices(r)]
    requests.append((encode(tok, "Question: 2+2?\nAnswer:"), encode(tok, " It is 4.\n#### 4")))
    batched = continuation_logprobs(model, tok, requests, batch_size=3)
    expected = [reference_logprob(model, c, t) for c, t in requests]
    assert batched == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_a_shared_prompt_prefix_is_run_once_and_scores_as_whole_sequences(name):
    from loracombench.models import load_model

    loaded = load_model(name)
    model, tok = loaded.model, loaded.tokenizer
    task = get_task("ag_news")
    rows = [{"text": "Short one", "label": 0}, {"text": "A much longer article about markets " * 4, "label": 2},
            {"text": "Stocks fell", "label": 2}]
    requests = [(encode(tok, task.prompt(r)), encode(tok, " " + c)) for r in rows for c in task.choices(r)]
    prefix = shared_prefix([context for context, _ in requests])
    assert len(prefix) >= MIN_SHARED_PREFIX and prefix == requests[0][0][: len(prefix)]
    fed = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: fed.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    try:
        shared = continuation_logprobs(model, tok, requests, batch_size=2)
    finally:
        hook.remove()
    expected = [reference_logprob(model, c, t) for c, t in requests]
    assert shared == pytest.approx(expected, abs=1e-4)
    assert shared == pytest.approx(continuation_logprobs(model, tok, requests, batch_size=2, share_prefix=False),
                                   abs=1e-4)
    assert fed[0] == (1, len(prefix))  # the prefix alone, once; then rows without it
    assert all(width == max(len(c) + len(t) for c, t in requests) - len(prefix) for _, width in fed[1:2])


def test_no_prefix_is_shared_when_contexts_differ_early_or_it_would_swallow_a_context():
    assert shared_prefix([[1, 2, 3], [1, 2, 4]]) == []  # below MIN_SHARED_PREFIX
    long = list(range(20))
    assert shared_prefix([long + [7], long + [8]]) == long
    assert shared_prefix([long, long + [5, 6]]) == long[:-1]  # a context's last token stays in its row


def test_acc_and_acc_norm_equal_a_hand_computation(tiny_gpt2, tmp_path):
    from loracombench.evaluation import EvalConfig, evaluate

    model, tok = tiny_gpt2.model, tiny_gpt2.tokenizer
    task = get_task("ag_news")
    rows = [{"text": f"{words} story", "label": y}
            for y, words in enumerate(["war election", "goal match", "stocks profit", "chip software"])]
    result = evaluate(model, tok, task, rows, EvalConfig(batch_size=3), {}, tmp_path, progress=False)["metrics"]
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    hits = hits_norm = 0
    for row, predicted in zip(rows, predictions):
        context = encode(tok, task.prompt(row))
        summed = [reference_logprob(model, context, encode(tok, " " + c)) for c in task.choices(row)]
        # lm-eval's acc_norm divides by the choice's length in characters, delimiter excluded.
        per_char = [v / len(c) for v, c in zip(summed, task.choices(row))]
        assert predicted["prediction"] == max(range(4), key=summed.__getitem__)
        assert predicted["prediction_norm"] == max(range(4), key=per_char.__getitem__)
        hits += predicted["prediction"] == row["label"]
        hits_norm += predicted["prediction_norm"] == row["label"]
    assert result["accuracy"]["value"] == hits / 4 and result["accuracy_norm"]["value"] == hits_norm / 4
    recalls = [result[f"recall_{name}"]["value"] for name in task.choices(rows[0])]
    assert recalls == [float(p["correct"]) for p in predictions]


def test_a_continuation_is_split_off_as_lm_eval_splits_it(tiny_gpt2):
    """lm-eval's TemplateLM._encode_pair: the context's trailing space goes to the continuation,
    and the continuation's tokens are those of running text."""
    tok = tiny_gpt2.tokenizer
    assert encode(tok, "Topic: ") + encode(tok, "World") != encode(tok, "Topic: World")  # apart, a stray space
    context, continuation = encode_pair(tok, "Topic: ", "World")
    assert context == encode(tok, "Topic:") and continuation == encode(tok, " World")
    assert context + continuation == encode(tok, "Topic: World")
    # without trailing whitespace the split is the one both ways agree on
    assert encode_pair(tok, "Topic:", " World") == (encode(tok, "Topic:"), encode(tok, " World"))


def test_a_prompt_ending_in_a_space_scores_its_choices_as_running_text(tiny_gpt2, monkeypatch):
    model, tok = tiny_gpt2.model, tiny_gpt2.tokenizer
    task = get_task("ag_news")
    row = {"text": "stocks profit story", "label": 2}
    prompt = task.prompt(row)
    monkeypatch.setattr(type(task), "prompt", lambda self, r: prompt + " ")
    monkeypatch.setattr(type(task), "choice_delimiter", "")
    scores = score_choices(model, tok, task, [row], batch_size=2, progress=False)[0]
    expected = [reference_logprob(model, encode(tok, prompt), encode(tok, " " + c)) for c in task.choices(row)]
    assert scores == pytest.approx(expected, abs=1e-4)


def test_confusion_matrix_counts_gold_by_prediction():
    matrix = metrics.confusion_matrix([0, 0, 1, 2], [0, 1, 1, 0], ["A", "B", "C"])
    assert matrix == {"classes": ["A", "B", "C"], "counts": [[1, 1, 0], [0, 1, 0], [1, 0, 0]]}


def test_wilson_interval_known_values():
    low, high = metrics.wilson_interval(77, 100)
    assert (round(low, 4), round(high, 4)) == (0.6785, 0.8416)
    assert metrics.wilson_interval(0, 30)[0] == 0.0 and metrics.wilson_interval(0, 30)[1] == pytest.approx(0.1135, abs=1e-4)
    with pytest.raises(ValueError):
        metrics.wilson_interval(0, 0)


def test_bootstrap_interval_brackets_the_mean():
    result = metrics.bootstrap_mean([1.0, 2.0, 3.0, 4.0, 10.0])
    assert result["value"] == 4.0 and result["ci_low"] < 4.0 < result["ci_high"]


def test_bootstrap_interval_is_a_95_percent_one():
    """On 400 normal draws the percentile bootstrap agrees with mean ± 1.96·s/√n to a few percent;
    a 50% or 99% interval would be a third or 1.3 times as wide."""
    values = np.random.default_rng(3).normal(size=400)
    result = metrics.bootstrap_mean(values)
    half_width = 1.96 * values.std(ddof=1) / np.sqrt(values.size)
    assert (result["ci_high"] - result["ci_low"]) / 2 == pytest.approx(half_width, rel=0.08)
    assert (result["ci_high"] + result["ci_low"]) / 2 == pytest.approx(values.mean(), abs=0.15 * half_width)


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("x = 4\n#### 4\n\n\nQuestion: next", ("Question:", "\n\n\n")) == "x = 4\n#### 4"
    assert cut_at_stop("no stop here", ("Question:",)) == "no stop here"


def test_evaluate_writes_metrics_and_predictions(tiny_gpt2, tmp_path):
    rows = [{"text": f"story {i}", "label": i % 4} for i in range(8)]
    record = evaluate(tiny_gpt2.model, tiny_gpt2.tokenizer, get_task("ag_news"), rows, EvalConfig(),
                      {"label": "base", "kind": "base"}, out_dir=tmp_path / "ag", progress=False)
    assert metrics.read_result(tmp_path / "ag") == record
    lines = (tmp_path / "ag" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 8 and all(len(json.loads(l)["logprobs"]) == 4 for l in lines)
    accuracy = record["metrics"]["accuracy"]
    assert accuracy["value"] == sum(json.loads(l)["correct"] for l in lines) / 8
    assert 0 <= accuracy["ci_low"] <= accuracy["value"] <= accuracy["ci_high"] <= 1
    # What lm-eval records too: the task's version, and each prediction's dataset row.
    assert record["task_version"] == get_task("ag_news").fingerprint()
    assert [json.loads(l)["doc"] for l in lines] == rows


def transformers_generate(model, tok, prompts, max_new_tokens, stops):
    """The reference: one left-padded batch through transformers' generate(), greedy."""
    batch = left_pad([encode(tok, p) for p in prompts], tok.pad_token_id)
    batch.pop("position_ids")
    with torch.no_grad():
        tokens = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, stop_strings=list(stops),
                                tokenizer=tok, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return [cut_at_stop(tok.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True), stops)
            for row in tokens]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_greedy_decoding_drops_finished_rows_and_equals_transformers_generate(name):
    from loracombench.models import load_model

    loaded = load_model(name)
    model, tok = loaded.model.eval(), copy.deepcopy(loaded.tokenizer)
    prompts = ["Question: What is 2 plus 2?\nAnswer:", "Hi", "A much longer prompt about markets " * 3,
               "Numbers: 1 2 3", "Topic:"]
    prompt_ids = [encode(tok, p) for p in prompts]
    free = greedy_tokens(model, tok, prompt_ids, 12, stops=())
    assert [len(t) for t in free] == [12] * 5  # no stop: every row runs to max_new_tokens
    # One row ends at a stop string, another at an EOS token, each taken from that row's own
    # greedy tokens and found in no other row; the others run to max_new_tokens.
    texts = [tok.decode(row) for row in free]
    stop_row, stop = next((r, text) for r, row in enumerate(free) for t in row
                          if (text := tok.decode([t]).strip())
                          and not any(text in texts[j] for j in range(5) if j != r))
    eos_row, tok.eos_token_id = next((r, t) for r, row in enumerate(free) if r != stop_row for t in row
                                     if not any(t in free[j] for j in range(5) if j != r))
    stops = (stop,)
    expected = transformers_generate(model, tok, prompts, 12, stops)
    batch_rows = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: batch_rows.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        tokens = greedy_tokens(model, tok, prompt_ids, 12, stops)
    finally:
        hook.remove()
    assert generate(model, tok, prompts, EvalConfig(max_new_tokens=12, generate_batch_size=5), stops, False) == expected
    assert [len(t) < 12 for t in tokens] == [r in (stop_row, eos_row) for r in range(5)]
    decoding = batch_rows[1:]  # after the prefill of all 5 rows, one call per step
    assert batch_rows[0] == 5 and decoding == sorted(decoding, reverse=True) and decoding[-1] == 3
    assert sum(decoding) == sum(len(t) - 1 for t in tokens)  # a finished row is never computed again


def test_gsm8k_evaluation_generates_extracts_and_scores_nll(tiny_gpt2, tmp_path):
    rows = [{"question": f"What is {a} plus {a}?", "answer": f"{a}+{a}={2 * a}\n#### {2 * a}"} for a in (1, 2, 3)]
    config = EvalConfig(n_generate=2, max_new_tokens=6)
    record = evaluate(tiny_gpt2.model, tiny_gpt2.tokenizer, get_task("gsm8k"), rows, config,
                      {"label": "base", "kind": "base"}, out_dir=tmp_path / "g", progress=False)
    predictions = [json.loads(l) for l in (tmp_path / "g" / "predictions.jsonl").read_text().splitlines()]
    assert [("output" in p) for p in predictions] == [True, True, False]
    assert [p["gold"] for p in predictions] == ["2", "4", "6"]
    task = get_task("gsm8k")
    for p, row in zip(predictions[:2], rows):  # the task's own scoring, field for field
        assert {k: p[k] for k in task.score_output(p["output"], row)} == task.score_output(p["output"], row)
    for metric, field in task.generation_metrics.items():
        assert record["metrics"][metric]["value"] == sum(p[field] for p in predictions[:2]) / 2
    assert record["metrics"]["exact_match_flexible"]["n"] == 2 and record["metrics"]["gold_nll"]["n"] == 3
    assert record["metrics"]["gold_nll"]["value"] == pytest.approx(sum(p["gold_nll"] for p in predictions) / 3, abs=1e-4)
    assert record["metrics"]["gold_nll"]["value"] > 0


def test_a_gold_nll_after_a_prompt_ending_in_a_space_is_that_of_running_text(tiny_gpt2, tmp_path, monkeypatch):
    model, tok = tiny_gpt2.model, tiny_gpt2.tokenizer
    task = get_task("gsm8k")
    row = {"question": "What is 2 plus 2?", "answer": "2+2=4\n#### 4"}
    prompt = task.prompt(row)
    monkeypatch.setattr(type(task), "prompt", lambda self, r: prompt + " ")
    evaluate(model, tok, task, [row], EvalConfig(n_generate=0), {"label": "base", "kind": "base"},
             out_dir=tmp_path / "g", progress=False)
    nll = json.loads((tmp_path / "g" / "predictions.jsonl").read_text())["gold_nll"]
    target = encode(tok, " " + task.target(row))
    assert nll == pytest.approx(-reference_logprob(model, encode(tok, prompt), target) / len(target), abs=1e-4)


def test_a_prompt_of_whitespace_alone_is_refused(tiny_gpt2):
    with pytest.raises(ValueError, match="a prompt needs text before its continuation"):
        encode_pair(tiny_gpt2.tokenizer, " \n", "World")


def test_evaluate_refuses_no_rows(tiny_gpt2):
    with pytest.raises(ValueError, match="no ag_news examples"):
        evaluate(tiny_gpt2.model, tiny_gpt2.tokenizer, get_task("ag_news"), [], EvalConfig(), {})


def test_few_row_linear_is_f_linear_summed_another_way_and_leaves_many_rows_alone():
    from loracombench.decoding import FewRowLinear

    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(300, 40, generator=generator), torch.randn(300, generator=generator)
    calls = []
    mode = FewRowLinear(max_rows=8)
    mode.linear = lambda *a, _inner=mode.linear, **k: calls.append(a[0].shape) or _inner(*a, **k)
    for shape in [(40,), (3, 40), (2, 4, 40), (3, 1, 40)]:
        x = torch.randn(*shape, generator=generator)
        with mode:
            out = torch.nn.functional.linear(x, weight, bias)
            unbiased = torch.nn.functional.linear(x, weight)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(unbiased, x @ weight.t(), rtol=1e-5, atol=1e-5)
        assert out.shape == (*shape[:-1], 300) and out.is_contiguous()
    assert len(calls) == 8  # every F.linear went through the mode
    many = torch.randn(9, 40, generator=generator)  # above max_rows: F.linear itself, bit for bit
    expected = torch.nn.functional.linear(many, weight, bias)
    with FewRowLinear(max_rows=8):
        assert torch.equal(torch.nn.functional.linear(many, weight, bias), expected)


def test_a_reserved_cache_layer_holds_what_a_dynamic_layer_holds_through_growth_rows_and_crops():
    from transformers.cache_utils import DynamicLayer

    from loracombench.decoding import ReservedLayer

    generator = torch.Generator().manual_seed(0)
    reserved, dynamic = ReservedLayer(room=2), DynamicLayer()
    for length in (3, 1, 1, 1, 2):  # a prefill, then steps; the room of 2 is outgrown twice
        keys = torch.randn(4, 2, length, 5, generator=generator)
        values = torch.randn(4, 2, length, 7, generator=generator)
        got, expected = reserved.update(keys, values), dynamic.update(keys, values)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    rows = torch.tensor([3, 1])
    for layer in (reserved, dynamic):
        layer.batch_select_indices(rows)
        layer.crop(-2)
        layer.batch_repeat_interleave(3)
    keys, values = torch.randn(6, 2, 1, 5, generator=generator), torch.randn(6, 2, 1, 7, generator=generator)
    assert all(torch.equal(a, b) for a, b in zip(reserved.update(keys, values), dynamic.update(keys, values)))
    assert reserved.get_seq_length() == dynamic.get_seq_length() == 7
    with pytest.raises(ValueError, match="negative number"):
        reserved.crop(1)


def test_models_with_other_cache_layers_keep_the_cache_transformers_builds():
    from transformers import LlamaConfig, MistralConfig

    from loracombench.decoding import ReservedLayer, reserved_cache

    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=50)
    assert all(isinstance(layer, ReservedLayer) for layer in reserved_cache(LlamaConfig(**small), room=4).layers)
    assert reserved_cache(MistralConfig(sliding_window=4, **small), room=4) is None
