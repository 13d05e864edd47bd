"""The registry of merge methods, their parameters, and the parsing of parameter values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

_TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
_FALSE_WORDS = frozenset({"false", "0", "no", "off"})


class MergeError(ValueError):
    """Every bad-input error the merging library raises: unknown names, bad values, unmergeable adapters."""


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method; `check` returns an error text for a bad value, or None."""

    name: str
    default: object
    kind: type
    help: str
    check: Callable[[object], str | None] | None = None


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    `fn(factors, weights, params, module) -> (LoraFactors, info)` merges one module: `factors` holds
    float64 LoraFactors in adapter order (an adapter lacking the module is a rank-0 zero update),
    `params` is resolved by parse_params, and `module` is the module's name (random methods seed
    per module with it). `averages` describes the default parameters: True when two identical
    adapters at weights (1, 1) give what that adapter gives alone at weight 1 (for most methods
    the adapter itself), False when they give what it gives alone at weight 2. `check_weights`,
    when set, refuses weights the method cannot use with these params (raising MergeError) without
    any factors, so that a config is refused before its experts train.
    """

    name: str
    fn: Callable
    params: tuple[Param, ...]
    reference: str
    summary: str
    averages: bool
    needs_equal_ranks: bool
    takes_union_of_modules: bool
    check_weights: Callable[[list[float], dict], object] | None = None


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> None:
    if method.name in METHODS:
        raise MergeError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method


def get_method(name: str) -> MergeMethod:
    if name not in METHODS:
        raise MergeError(f"unknown merge method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def parse_params(method: MergeMethod, raw: dict[str, str | int | float | bool]) -> dict:
    """Typed values for every parameter of `method`: those given in `raw` (CLI strings allowed), else defaults."""
    known = {param.name: param for param in method.params}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise MergeError(f"unknown parameter(s) {', '.join(unknown)} for merge method {method.name!r}; "
                         f"{_valid_params_text(method)}")
    return {param.name: _resolve(method, param, raw) for param in method.params}


def _resolve(method: MergeMethod, param: Param, raw: dict) -> object:
    value = _coerce(raw[param.name], param.kind) if param.name in raw else param.default
    if value is None:
        problem = f"must be {dict(int='an integer', float='a number', str='a string').get(param.kind.__name__, 'a ' + param.kind.__name__)}"
    else:
        problem = param.check(value) if param.check else None
    if problem:
        raise MergeError(f"{method.name}: invalid value {raw.get(param.name)!r} for parameter "
                         f"{param.name!r}: {problem}; {_valid_params_text(method)}")
    return value


def _coerce(value: object, kind: type) -> object:
    """The value converted to `kind`, or None when it cannot be (bools never pass as numbers)."""
    if isinstance(value, str) and kind is not str:
        return _from_text(value.strip(), kind)
    if kind is bool:
        return value if isinstance(value, bool) else None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    if kind is int:
        return int(value) if float(value).is_integer() else None
    if kind is float:
        return float(value)
    return value if isinstance(value, kind) else None


def _from_text(text: str, kind: type) -> object:
    if kind is bool:
        lowered = text.lower()
        return True if lowered in _TRUE_WORDS else False if lowered in _FALSE_WORDS else None
    try:
        return kind(text)
    except ValueError:
        return None


def _valid_params_text(method: MergeMethod) -> str:
    if not method.params:
        return f"{method.name!r} takes no parameters"
    described = "; ".join(f"{p.name} ({p.kind.__name__}, default {p.default!r}): {p.help}" for p in method.params)
    return f"valid parameters: {described}"
