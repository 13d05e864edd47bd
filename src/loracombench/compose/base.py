"""The composition contract: how trained experts become one model that the evaluator scores.

A composition method is one module with one class. `build` turns the experts (and whatever the
method declares it needs: validation examples, the tasks' training prompts, gradients) into
artefacts in a folder: a merged adapter, a router, a search trajectory. `load` turns that
folder into a `Composed`: which route scores each example, and the model behind each route.
A static merge has one route; a router has one per expert; the pipeline needs no edit for a new
method. Every method declares its `Needs`, and the table prints them beside its scores, so that
no method looks free when it is not.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, ContextManager

from .. import training
from ..tasks import Task

ONLY_ROUTE = "model"


@dataclass(frozen=True)
class Needs:
    """What a composition uses beyond the experts' weights."""

    validation_per_task: int = 0  # labelled validation examples of each task (at most: see validation_note)
    validation_note: str = ""  # what the summary adds when fewer are used for some tasks
    training_data: bool = False  # the tasks' labelled training rows, targets and all
    gradients: bool = False  # trains something by backpropagation through the base model
    router_training: bool = False  # the tasks' training prompts, labelled with their task
    task_label_at_inference: bool = False  # is told each test example's task
    base_forward: bool = False  # runs the base model while building (a search, training)
    routing_forward: bool = False  # runs the base model over each test prompt to choose its route

    def summary(self) -> str:
        parts = []
        if self.validation_per_task:
            parts.append(f"{self.validation_per_task} val/task{self.validation_note}")
        if self.training_data:
            parts.append("training data")
        elif self.router_training:
            parts.append("training prompts")
        if self.gradients:
            parts.append("gradients")
        elif self.base_forward:
            parts.append("forward passes")
        if self.routing_forward:
            parts.append("a base pass per prompt")
        if self.task_label_at_inference:
            parts.append("task label at test")
        return ", ".join(parts) or "weights only"


@dataclass
class BuildInputs:
    """Everything a composition may use; a method reads only what its `needs()` declares."""

    experts: dict[str, Path]  # task -> trained adapter folder, in the config's task order
    seed: int
    # The shared base model of this process, borrowed for the block and returned pristine
    # (adapters.SharedBase.borrowed); only for methods that declare base_forward or gradients.
    borrow_base: Callable[[], ContextManager] | None = None
    validation: dict[str, list[dict]] = field(default_factory=dict)  # needs.validation_per_task rows per task
    train_rows: dict[str, list[dict]] = field(default_factory=dict)  # the experts' training rows per task
    train_settings: dict = field(default_factory=dict)  # task -> config.TrainSettings of its expert
    device: str = "auto"
    dtype: str = "auto"  # config.dtype: the precision of forward and backward passes
    # A folder that survives a killed build (unlike out_dir, a staging folder), for checkpoints
    # that a rerun resumes from; removed once the cell is complete. None: no resumable state.
    scratch: Path | None = None
    progress: bool = False


class Composed(ABC):
    """What the evaluator scores: a route for every example, and the model behind each route."""

    @abstractmethod
    def assign(self, task: Task, prompts: list[str], shared) -> list[str]:
        """The route of each prompt. Only a method whose needs() declares task_label_at_inference
        may read `task`; any other decides from the prompt text alone. `shared` is the process's
        adapters.SharedBase, for a router that reads the base model (needs().routing_forward)."""

    @abstractmethod
    def open(self, route: str, shared) -> ContextManager:
        """The torch model behind a route, built on the process's adapters.SharedBase."""

    def expected_route(self, task: Task) -> str | None:
        """The route a perfect router sends this task's examples to (routing accuracy), or None."""
        return None


class OneModel(Composed):
    """Every example scored by one model: the base with one adapter folded in (or the base)."""

    def __init__(self, adapter: Path | None):
        self.adapter = adapter

    def assign(self, task: Task, prompts: list[str], shared) -> list[str]:
        return [ONLY_ROUTE] * len(prompts)

    def open(self, route: str, shared) -> ContextManager:
        return shared.with_adapter(self.adapter)


class RoutedAdapters(Composed):
    """Each example scored by the expert its router picks (sequence-level routing)."""

    def __init__(self, adapters: dict[str, Path], router: Callable[[Task, list[str]], list[str]] | None):
        self.adapters, self.router = adapters, router

    def routes(self, task: Task, prompts: list[str], shared) -> list[str]:
        """The router's choices; a router that reads the base model overrides this."""
        return self.router(task, prompts)

    def assign(self, task: Task, prompts: list[str], shared) -> list[str]:
        routes = list(self.routes(task, prompts, shared))
        unknown = sorted(set(routes) - set(self.adapters))
        if len(routes) != len(prompts) or unknown:
            raise RuntimeError(f"the router returned {len(routes)} routes for {len(prompts)} prompts, "
                               f"unknown routes {unknown}; valid: {sorted(self.adapters)}")
        return routes

    def open(self, route: str, shared) -> ContextManager:
        return shared.with_adapter(self.adapters[route])

    def expected_route(self, task: Task) -> str | None:
        return task.name if task.name in self.adapters else None


class Composition(ABC):
    """One composition method. Subclasses set `name` and `paper`, take their parameters as
    keyword arguments (validated in __init__, one clear error each) and implement build/load."""

    name: ClassVar[str]
    paper: ClassVar[str]  # the paper it implements, with its arXiv id or venue
    # Files besides weights (*.safetensors) and adapter configs whose content decides the composed
    # model (a router's routes): downstream cache keys hash them. Logs and timings stay out.
    artefacts: ClassVar[tuple[str, ...]] = ()
    # True for a composition that trains or searches on training.batch_loss_sum: its cache key then
    # carries training.TARGET_LOSS_VERSION, so a fix to that loss rebuilds it.
    uses_target_loss: ClassVar[bool] = False
    # Libraries besides cache.COMPOSITION_LIBRARIES whose version can change what build() makes:
    # their versions join the cache key.
    libraries: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.uses_target_loss and cls.loss_batches is Composition.loss_batches:
            raise TypeError(f"{cls.__name__} sets uses_target_loss, so it must define loss_batches")

    def __init__(self, **params):
        if params:
            raise ValueError(f"composition {self.name!r} takes no parameters, got {sorted(params)}")
        self.params: dict = {}

    def needs(self) -> Needs:
        return Needs()

    def key(self) -> dict:
        """What decides the result besides the experts and the inputs it needs, for cache keys."""
        key = {"composition": self.name, "params": self.params}
        return {**key, "target_loss": training.TARGET_LOSS_VERSION} if self.uses_target_loss else key

    def loss_batches(self, inputs: BuildInputs, tokenizer) -> list[list[training.Example]]:
        """Every batch build() takes training.batch_loss_sum on, formed as build forms it, without
        building (scripts/lost_targets.py audits them). Every composition that sets
        uses_target_loss defines it (checked when the class is made); the others have none."""
        raise ValueError(f"composition {self.name!r} trains on no target loss, so it has no loss batches")

    @abstractmethod
    def build(self, inputs: BuildInputs, out_dir: Path) -> dict:
        """Write the artefacts into out_dir (a fresh staging folder); return metadata for the
        record (what it used: data, compute time, search trajectory summary, router accuracy)."""

    @abstractmethod
    def load(self, out_dir: Path) -> Composed:
        """The built folder as something the evaluator scores."""


def check_params(name: str, given: dict, allowed: dict) -> dict:
    """Parameters with defaults filled in; an unknown name is one error listing the valid ones."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"composition {name!r}: unknown parameter(s) {unknown}; valid: {sorted(allowed) or 'none'}")
    return {**allowed, **given}

