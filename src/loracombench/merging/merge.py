"""merge_modules: validate adapters' factors, merge every module with a registered method."""

from __future__ import annotations

import math

import torch

from loracombench.merging.factors import LoraFactors
from loracombench.merging.registry import MergeError, MergeMethod, get_method, parse_params


def merge_modules(
    method: str,
    modules: dict[str, list[LoraFactors | None]],
    weights: list[float] | None = None,
    params: dict | None = None,
) -> tuple[dict[str, LoraFactors], dict]:
    """Merge each module's adapters with `method`.

    `modules` maps a module name to its factors in adapter order, None where an adapter lacks the
    module. `weights` default to 1.0 per adapter; each method documents how they enter. Returns the
    merged float32 factors per module and an info dict: method, resolved params, weights,
    output_ranks per module, per_module method-specific details, and max_relative_error when the
    method re-factorises with loss.
    """
    spec = get_method(method)
    resolved = parse_params(spec, params or {})
    count = adapter_count(modules)
    weights = checked_weights(weights, count)
    ready = {name: checked_module(name, factors, spec) for name, factors in modules.items()}
    merged, details = {}, {}
    for name, factors in ready.items():
        result, details[name] = spec.fn(factors, weights, resolved, name)
        merged[name] = as_float32(result)
        if not finite(merged[name]):  # the inputs were checked finite: the weights overflowed
            raise MergeError(f"{method} of finite adapters gave non-finite values in {name}: with weights {weights} "
                             f"and parameters {resolved} the result overflows float32")
    return merged, merge_info(spec, resolved, weights, merged, details)


def finite(factors: LoraFactors) -> bool:
    return bool(torch.isfinite(factors.lora_A).all() and torch.isfinite(factors.lora_B).all()
                and math.isfinite(factors.scale))


def adapter_count(modules: dict[str, list]) -> int:
    if not modules:
        raise MergeError("no modules to merge")
    counts = {len(factors) for factors in modules.values()}
    if len(counts) > 1:
        raise MergeError(f"modules list different numbers of adapters: {sorted(counts)}; "
                         "pass None for an adapter that lacks a module")
    count = counts.pop()
    if count == 0:
        raise MergeError("the adapter list is empty")
    return count


def checked_weights(weights: list[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0] * count
    if len(weights) != count:
        raise MergeError(f"got {len(weights)} weights for {count} adapters")
    if not all(math.isfinite(float(w)) for w in weights):
        raise MergeError(f"weights must be finite, got {list(weights)}")
    return [float(w) for w in weights]


def checked_module(name: str, factors: list[LoraFactors | None], spec: MergeMethod) -> list[LoraFactors]:
    """The module's factors in float64, each checked; a missing adapter becomes a rank-0 zero update."""
    present = [(i, checked_factor(name, i, f)) for i, f in enumerate(factors) if f is not None]
    missing = [i for i, f in enumerate(factors) if f is None]
    if not present:
        raise MergeError(f"module {name!r} has no factors in any adapter")
    if missing and not spec.takes_union_of_modules:
        raise MergeError(f"module {name!r} is missing from adapter(s) {missing}; method {spec.name!r} "
                         "needs every module in every adapter (methods such as task_arithmetic take the union)")
    out_features, in_features = check_same_shapes(name, present)
    if spec.needs_equal_ranks and len({f.rank for _, f in present}) > 1:
        raise MergeError(f"module {name!r}: method {spec.name!r} needs equal ranks, got "
                         f"{[f.rank for _, f in present]}")
    by_index = dict(present)
    empty = LoraFactors(torch.zeros(0, in_features, dtype=torch.float64),
                        torch.zeros(out_features, 0, dtype=torch.float64), 1.0)
    return [by_index.get(i, empty) for i in range(len(factors))]


def checked_factor(name: str, index: int, factors: LoraFactors) -> LoraFactors:
    where = f"module {name!r}, adapter {index}"
    if not isinstance(factors, LoraFactors):
        raise MergeError(f"{where}: expected LoraFactors or None, got {type(factors).__name__}")
    lora_A, lora_B = factors.lora_A, factors.lora_B
    if not (isinstance(lora_A, torch.Tensor) and isinstance(lora_B, torch.Tensor)):
        raise MergeError(f"{where}: lora_A and lora_B must be tensors")
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != lora_B.shape[1] or lora_A.shape[0] == 0:
        raise MergeError(f"{where}: lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} "
                         "are not (r, in) and (out, r) with r >= 1")
    if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all() and math.isfinite(factors.scale)):
        raise MergeError(f"{where}: factors or scale contain NaN or Inf")
    return LoraFactors(lora_A.detach().double(), lora_B.detach().double(), float(factors.scale))


def check_same_shapes(name: str, present: list[tuple[int, LoraFactors]]) -> tuple[int, int]:
    shapes = {(f.lora_B.shape[0], f.lora_A.shape[1]) for _, f in present}
    if len(shapes) > 1:
        raise MergeError(f"module {name!r}: adapters disagree on (out_features, in_features): {sorted(shapes)}")
    return shapes.pop()


def as_float32(factors: LoraFactors) -> LoraFactors:
    return LoraFactors(factors.lora_A.float().contiguous(), factors.lora_B.float().contiguous(),
                       float(factors.scale))


def merge_info(spec: MergeMethod, params: dict, weights: list[float], merged: dict, details: dict) -> dict:
    info = {
        "method": spec.name,
        "params": params,
        "weights": weights,
        "output_ranks": {name: factors.rank for name, factors in merged.items()},
        "per_module": {name: {k: v for k, v in d.items() if k != "rank"} for name, d in details.items()},
    }
    errors = [d["relative_error"] for d in details.values() if "relative_error" in d]
    if errors:
        info["max_relative_error"] = max(errors)
    return info
