"""Composition registry: a dict of composition classes and one lookup that names the valid ones.

Static merges (every method in merging/) are one composition kind; routers, weight searches and
trained combinations are others. A new method is one module here plus one `register` line."""

from __future__ import annotations

import inspect

from .arrow_router import ArrowRouting
from .arrow_sequence_router import ArrowSequenceRouting
from .base import BuildInputs, Composed, Composition, Needs, OneModel, RoutedAdapters
from .classifier_router import ClassifierRouting
from .lorahub import LoraHub
from .lora_soups import LoraSoups
from .multitask import Multitask
from .oracle import OracleRouting
from .static_merge import StaticMerge
from .weight_sweep import WeightSweep

COMPOSITIONS: dict[str, type[Composition]] = {}


def register(cls: type[Composition]) -> type[Composition]:
    if cls.name in COMPOSITIONS:
        raise ValueError(f"composition {cls.name!r} is already registered")
    COMPOSITIONS[cls.name] = cls
    return cls


def get_composition(name: str, params: dict | None = None) -> Composition:
    """An instance of a registered composition with its parameters checked."""
    try:
        cls = COMPOSITIONS[name]
    except KeyError:
        raise ValueError(f"unknown composition {name!r}; valid: {', '.join(sorted(COMPOSITIONS))}") from None
    signature = inspect.signature(cls)
    try:
        signature.bind(**(params or {}))
    except TypeError as err:  # a parameter the class does not take, or one it needs and lacks
        raise ValueError(f"composition {name!r}: {err}; it takes {', '.join(signature.parameters)}") from None
    return cls(**(params or {}))


register(StaticMerge)
register(OracleRouting)
register(ClassifierRouting)
register(ArrowRouting)
register(ArrowSequenceRouting)
register(LoraHub)
register(Multitask)
register(LoraSoups)
register(WeightSweep)

__all__ = ["COMPOSITIONS", "BuildInputs", "Composed", "Composition", "Needs", "OneModel", "RoutedAdapters",
           "get_composition", "register"]
