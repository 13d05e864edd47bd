"""Scoring every model the same way: log-likelihood multiple choice for AG News, greedy
generation and the gold target's per-token NLL for GSM8K (task.target: the solution the experts
train on, for GSM8K without calculator annotations; the EOS they train on after it is not
scored). A generation task extracts and compares its own answers (Task.score_output); this
module only decodes and aggregates."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import metrics
from .batching import left_pad
from .models import autocast, environment
from .tasks import Task


@dataclass
class EvalConfig:
    n_eval: int | None = 200  # examples scored by log-likelihood (AG News choices, GSM8K gold NLL); None: all
    n_generate: int | None = 30  # GSM8K problems answered by greedy generation (a prefix of the sample); None: all
    max_new_tokens: int = 256
    batch_size: int = 8  # config.EvalSettings says why 8
    generate_batch_size: int = 32
    seed: int = 1234
    split: str = "test"
    dtype: str = "auto"  # the forward-pass precision (models.autocast): fp32 on CPU, bf16 on CUDA

    def __post_init__(self):
        """Sizes are counts: a zero or negative one would slice or batch silently wrong."""
        at_least = {"n_eval": 1, "n_generate": 0, "max_new_tokens": 1, "batch_size": 1, "generate_batch_size": 1}
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is None and name in ("n_eval", "n_generate"):  # None: all
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def model_device(model) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------- log-likelihood scoring

def _carriers(requests: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int], list[int]]]:
    """Group requests into as few sequences as possible: (context, continuation, request ids).

    Every multi-token continuation needs its own sequence; a one-token continuation is read
    off the context-end position of any sequence with the same context. For AG News this
    scores four labels with one or two forward passes of the article instead of four."""
    by_context: dict[tuple, list[int]] = {}
    for index, (context, _) in enumerate(requests):
        by_context.setdefault(tuple(context), []).append(index)
    carriers = []
    for context, members in by_context.items():
        multi = [i for i in members if len(requests[i][1]) > 1]
        single = [i for i in members if len(requests[i][1]) == 1]
        carrier = multi[0] if multi else single[0]
        carriers.append((list(context), requests[carrier][1], [carrier] + single if carrier not in single else single))
        carriers += [(list(context), requests[i][1], [i]) for i in multi[1:]]
    return carriers


# A shared context prefix shorter than this is recomputed with every row: the cached pass and
# the per-batch cache copy cost more than they save.
MIN_SHARED_PREFIX = 8


@torch.inference_mode()
def continuation_logprobs(model, tokenizer, requests: list[tuple[list[int], list[int]]],
                          batch_size: int = EvalConfig.batch_size, desc: str = "score", progress: bool = False,
                          dtype: str = "auto", share_prefix: bool = True) -> list[float]:
    """Sum of log p(continuation | context) per (context_ids, continuation_ids) request.

    Left padding puts every continuation at the end of its row, so only the last positions'
    logits are computed (logits_to_keep), which skips most of the vocabulary projection. When
    every context starts with the same tokens (AG News's instruction, a few-shot preamble),
    those are run once and their key/value cache is reused by every row (share_prefix)."""
    if any(not cont for _, cont in requests):
        raise ValueError("every continuation needs at least one token")
    device = model_device(model)
    carriers = sorted(_carriers(requests), key=lambda c: -len(c[0]) - len(c[1]))
    prefix = shared_prefix([context for context, _, _ in carriers]) if share_prefix else []
    with autocast(device, dtype):
        prefix_cache = model(input_ids=torch.tensor([prefix], device=device), use_cache=True).cache \
            if prefix else None
    scores = [0.0] * len(requests)
    for start in tqdm(range(0, len(carriers), batch_size), desc=desc, disable=not progress):
        chunk = carriers[start: start + batch_size]
        longest = max(len(cont) for _, cont, _ in chunk)
        batch = left_pad([ctx[len(prefix):] + cont for ctx, cont, _ in chunk], tokenizer.pad_token_id, device)
        if prefix:
            batch = after_prefix(batch, prefix_cache, len(prefix))
        with autocast(device, dtype):
            logits = model(**batch, logits_to_keep=longest + 1).logits.float()
        for row, (_, carried, members) in enumerate(chunk):
            # Position t predicts token t+1; normalise only the positions that predict this row's
            # continuation (a whole-batch log-softmax over the vocabulary costs more than the model).
            logprobs = torch.log_softmax(logits[row, longest - len(carried): longest], dim=-1)
            for i in members:
                cont = torch.tensor(requests[i][1], device=device)
                scores[i] = logprobs[: len(cont)].gather(1, cont[:, None]).sum().item()
    return scores


def shared_prefix(contexts: list[list[int]]) -> list[int]:
    """The tokens every context starts with, short of each context's last token (its logits
    predict the continuation, so it must be computed in the row); [] below MIN_SHARED_PREFIX."""
    limit = min(len(c) for c in contexts) - 1
    first = contexts[0]
    length = 0
    while length < limit and all(c[length] == first[length] for c in contexts):
        length += 1
    return first[:length] if length >= MIN_SHARED_PREFIX else []


def after_prefix(batch: dict[str, torch.Tensor], prefix_cache, prefix_length: int) -> dict:
    """A left-padded batch continued from a cached prefix: the prefix is attended by every row,
    the padding between it and each row is masked, and positions count on from the prefix, so
    each row is computed as its whole sequence alone would be."""
    rows = batch["input_ids"].shape[0]
    cache = copy.deepcopy(prefix_cache)  # the forward pass appends to the cache it is given
    cache.batch_repeat_interleave(rows)
    seen = torch.ones(rows, prefix_length, dtype=batch["attention_mask"].dtype, device=batch["input_ids"].device)
    return {"input_ids": batch["input_ids"], "cache": cache,
            "attention_mask": torch.cat([seen, batch["attention_mask"]], dim=1),
            "position_ids": batch["position_ids"] + prefix_length}


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens as lm-eval-harness splits them (TemplateLM._encode_pair):
    the context's trailing whitespace moves to the continuation, context + continuation is encoded
    whole, and the continuation is what follows the context's own tokens. So the continuation
    starts with the token running text has there: encoded alone it would not, after a context
    ending in a space (": " + "World" gives "Ġ", "World" instead of "ĠWorld") or with a
    SentencePiece tokenizer that marks the start of every encoded text."""
    if not context.strip():
        raise ValueError(f"a prompt needs text before its continuation {continuation[:40]!r}; got {context!r}")
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = encode(tokenizer, context)
    return context_ids, encode(tokenizer, context + continuation)[len(context_ids):]


def score_choices(model, tokenizer, task: Task, rows: list[dict], batch_size: int, progress: bool,
                  dtype: str = "auto") -> list[list[float]]:
    """Per row, the summed log-likelihood of each choice after the task's delimiter (lm-eval's
    `target_delimiter`), as lm-eval-harness scores multiple choice."""
    requests, owners = [], []
    for index, row in enumerate(rows):
        for choice in task.choices(row):
            requests.append(encode_pair(tokenizer, task.prompt(row), task.choice_delimiter + choice))
            owners.append(index)
    flat = continuation_logprobs(model, tokenizer, requests, batch_size, f"score {task.name}", progress, dtype)
    per_row = [[] for _ in rows]
    for index, value in zip(owners, flat):
        per_row[index].append(value)
    return per_row


def argmax(values) -> int:
    return max(range(len(values)), key=values.__getitem__)


def predict_multiple_choice(model, tokenizer, task: Task, rows, indices, config: EvalConfig, progress: bool):
    """Per row: lm-eval's `acc` prediction (argmax of the summed log-likelihoods) and `acc_norm`
    prediction (argmax of the log-likelihood per character of the choice, without the delimiter,
    as lm-eval counts it)."""
    scores = score_choices(model, tokenizer, task, rows, config.batch_size, progress, config.dtype)
    predictions = []
    for index, row, s in zip(indices, rows, scores):
        g, lengths = task.gold_index(row), [len(choice) for choice in task.choices(row)]
        p, p_norm = argmax(s), argmax([v / n for v, n in zip(s, lengths)])
        predictions.append({"index": index, "gold": g, "prediction": p, "correct": g == p,
                            "prediction_norm": p_norm, "correct_norm": g == p_norm,
                            "logprobs": [round(v, 4) for v in s]})
    return predictions


def summarise_multiple_choice(task: Task, rows, predictions, config: EvalConfig) -> tuple[dict, dict]:
    """acc, acc_norm, macro-F1 and per-class recall; the confusion matrix of acc's predictions."""
    gold, predicted, choices = [p["gold"] for p in predictions], [p["prediction"] for p in predictions], task.choices(rows[0])
    result = metrics.classification_metrics(gold, predicted, choices)
    result["accuracy_norm"] = metrics.proportion(sum(p["correct_norm"] for p in predictions), len(rows))
    return result, {"confusion_matrix": metrics.confusion_matrix(gold, predicted, choices)}


# ---------------------------------------------------------------- generation

def cut_at_stop(text: str, stops) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text if cut < 0 else text[:cut]


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], config: EvalConfig, stops, progress: bool) -> list[str]:
    """Greedy, batched, left-padded, KV-cached decoding that stops each row at EOS or a stop string;
    each output is cut at its first stop string."""
    outputs = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in tqdm(range(0, len(order), config.generate_batch_size), desc="generate", disable=not progress):
        chunk = order[start: start + config.generate_batch_size]
        new_tokens = greedy_tokens(model, tokenizer, [encode(tokenizer, prompts[i]) for i in chunk],
                                   config.max_new_tokens, stops, config.dtype)
        for i, tokens in zip(chunk, new_tokens):
            outputs[i] = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stops)
    return outputs


def greedy_tokens(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, stops,
                  dtype: str = "auto") -> list[list[int]]:
    """Each prompt's greedy continuation, up to and including the token that ends it (EOS, the
    end of a stop string, or the max_new_tokens-th token).

    Written by hand rather than calling transformers' generate(), which computes every row of a
    batch until its last row stops: a GSM8K batch then costs its longest answer times the batch.
    Here a row that stops leaves the batch (its key/value cache rows are dropped), so each step
    computes only the rows still going. The tokens are generate()'s greedy ones (tested); its stop
    strings, like these, end a row at the first token that completes one."""
    device = model_device(model)
    batch = left_pad(prompt_ids, tokenizer.pad_token_id, device)
    window = max((len(stop) for stop in stops), default=0) + 1  # tokens that can hold a stop string
    new_tokens: list[list[int]] = [[] for _ in prompt_ids]
    going = list(range(len(prompt_ids)))
    mask, positions = batch["attention_mask"], batch["position_ids"][:, -1:]
    from .decoding import few_row_linear, reserved_cache

    with autocast(device, dtype):
        out = model(**batch, use_cache=True, logits_to_keep=1,
                    cache=reserved_cache(model.config, room=max_new_tokens))
    decoding = few_row_linear(device)
    for step in range(max_new_tokens):
        chosen = out.logits[:, -1].argmax(dim=-1)
        for row, token in zip(going, chosen.tolist()):
            new_tokens[row].append(token)
        still = [k for k, row in enumerate(going)
                 if not stopped(new_tokens[row], tokenizer, stops, window)] if step + 1 < max_new_tokens else []
        if not still:
            break
        if len(still) < len(going):
            keep = torch.tensor(still, device=device)
            out.cache.batch_select_indices(keep)
            going, mask, positions, chosen = [going[k] for k in still], mask[keep], positions[keep], chosen[keep]
        mask = torch.cat([mask, mask.new_ones(len(going), 1)], dim=1)
        positions = positions + 1
        with autocast(device, dtype), decoding:
            out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=positions, cache=out.cache,
                        use_cache=True)
    return new_tokens


def stopped(tokens: list[int], tokenizer, stops, window: int) -> bool:
    """Whether the last token is EOS or completes a stop string. Checked after every token, so a
    stop string in the text must end in its last token; special tokens are kept in the decoded
    text, so that a stop string such as "<|im_end|>" is seen."""
    if tokens[-1] == tokenizer.eos_token_id:
        return True
    text = tokenizer.decode(tokens[-window:], skip_special_tokens=False)
    return any(stop in text for stop in stops)


def generated(index: int, config: EvalConfig) -> bool:
    """Greedy generation covers a prefix of the evaluation sample (n_generate; None: all)."""
    return config.n_generate is None or index < config.n_generate


def predict_generation(model, tokenizer, task: Task, rows, indices, config: EvalConfig, progress: bool):
    """Per row: the gold target's per-token NLL (task.target as training encodes it, its EOS not
    scored), and for the generated prefix the output and the task's own extraction and comparison
    (Task.score_output)."""
    requests = [encode_pair(tokenizer, task.prompt(r), task.target(r)) for r in rows]
    logprobs = continuation_logprobs(model, tokenizer, requests, config.batch_size, "gold NLL", progress,
                                     config.dtype)
    chosen = [k for k, index in enumerate(indices) if generated(index, config)]
    outputs = dict(zip(chosen, generate(model, tokenizer, [task.prompt(rows[k]) for k in chosen], config,
                                        task.stop_strings, progress)))
    predictions = []
    for k, (index, row) in enumerate(zip(indices, rows)):
        entry = {"index": index, "gold": task.reference_answer(row),
                 "gold_nll": round(-logprobs[k] / len(requests[k][1]), 5)}
        if k in outputs:
            entry.update(output=outputs[k], **task.score_output(outputs[k], row))
        predictions.append(entry)
    return predictions


def summarise_generation(task: Task, rows, predictions, config: EvalConfig) -> tuple[dict, dict]:
    result = {"gold_nll": metrics.bootstrap_mean([p["gold_nll"] for p in predictions])}
    scored = [p for p in predictions if "output" in p]
    if scored:
        result.update(metrics.proportions(scored, task.generation_metrics))
    return result, {}


# task.kind -> (per-row predictions of one model, metrics and details from all rows' predictions)
SCORERS = {"multiple_choice": (predict_multiple_choice, summarise_multiple_choice),
           "generation": (predict_generation, summarise_generation)}


def evaluate(model, tokenizer, task: Task, rows: list[dict], config: EvalConfig, model_info: dict,
             out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Evaluate one model on one task's rows; write metrics.json + predictions.jsonl if out_dir."""
    started = time.time()
    _check_rows(task, rows)
    model.eval()
    predict, _ = SCORERS[task.kind]
    predictions = predict(model, tokenizer, task, rows, range(len(rows)), config, progress)
    return _record(task, rows, predictions, config, model_info, model_device(model), started, {}, out_dir)


def evaluate_composed(composed, shared, task: Task, rows: list[dict], config: EvalConfig, model_info: dict,
                      out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Evaluate a composition (compose.Composed) on the process's shared base model: each row is
    scored by the model of the route the composition assigns it, and the metrics are computed
    over all rows together. Routing is decided from the prompts (a router that may not know
    the task never sees it: see Composed.assign); its accuracy is recorded when the composition
    names the route each task should take."""
    started = time.time()
    _check_rows(task, rows)
    routes = composed.assign(task, [task.prompt(r) for r in rows], shared)
    predict, _ = SCORERS[task.kind]
    predictions: list[dict | None] = [None] * len(rows)
    for route in dict.fromkeys(routes):
        indices = [i for i, r in enumerate(routes) if r == route]
        with composed.open(route, shared) as model:
            model.eval()
            for i, p in zip(indices, predict(model, shared.loaded.tokenizer, task, [rows[i] for i in indices],
                                             indices, config, progress)):
                predictions[i] = p
    details, extra = {}, {}
    if len(set(routes)) > 1 or composed.expected_route(task) is not None:
        for p, route in zip(predictions, routes):
            p["route"] = route
        details["routes"] = {route: routes.count(route) for route in dict.fromkeys(routes)}
    expected = composed.expected_route(task)
    if expected is not None:
        extra["routing_accuracy"] = metrics.proportion(routes.count(expected), len(routes))
    return _record(task, rows, predictions, config, model_info, model_device(shared.loaded.model), started,
                   details, out_dir, extra)


def _check_rows(task: Task, rows: list[dict]) -> None:
    if not rows:
        raise ValueError(f"no {task.name} examples to evaluate")


def _record(task: Task, rows, predictions, config: EvalConfig, model_info: dict, device: torch.device,
            started: float, details: dict, out_dir, extra_metrics: dict | None = None) -> dict:
    _, summarise = SCORERS[task.kind]
    result, task_details = summarise(task, rows, predictions, config)
    result.update(extra_metrics or {})
    record = metrics.result_record(
        task=task.name, split=config.split, n=len(rows), seed=config.seed, model=model_info,
        metrics=result, primary_metric=task.primary_metric if task.primary_metric in result else "gold_nll",
        chance=task.chance, config=asdict(config), elapsed_s=round(time.time() - started, 2),
        details={**task_details, **details}, environment=environment(device), task_version=task.fingerprint())
    if out_dir is not None:
        metrics.write_result(out_dir, record, predictions, rows)
    return record
