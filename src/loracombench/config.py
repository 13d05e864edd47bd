"""The experiment config: validated, with unknown keys rejected, loadable from YAML presets."""

from __future__ import annotations

import hashlib
import json
import re
import types
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .tasks import TASKS

# The largest seed every generator here takes: numpy's and scikit-learn's random_state stop at 2^32 - 1.
MAX_SEED = 2**32 - 1

PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate; the message is one line."""


def flatten_validation_error(err: ValidationError, where: str | None = None,
                             names: dict[str, str] | None = None) -> str:
    """Pydantic's multi-line report as one line: where (a file), then each key path, rule and the
    value given. `names` renames top-level fields (to the command-line flags that set them)."""
    problems = []
    for error in err.errors():
        loc = [str(part) for part in error["loc"]]
        if loc and names:
            loc[0] = names.get(loc[0], loc[0])
        message = error["msg"].removeprefix("Value error, ")
        given = f" (got {error['input']!r})" if error["type"] not in ("missing", "value_error") else ""
        problems.append(f"{'.'.join(loc)}: {message}{given}" if loc else message)
    return (f"{where}: " if where else "") + "; ".join(problems)


def _bool_mismatch(annotation, value) -> str | None:
    """Why `value` must not fill a field of this type: pydantic's lax mode reads true as 1 for a
    number (`epochs: yes` trains one epoch) and 1 or "no" as a flag. Numbers given as strings
    stay accepted: YAML reads 1e-3 (no dot) as a string. Lists and dict values are checked item
    by item."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    allowed = set(typing.get_args(annotation)) if union else {annotation}
    if isinstance(value, bool) and bool not in allowed and allowed & {int, float}:
        return "a number, not true/false"
    if allowed <= {bool, type(None)} and bool in allowed and not isinstance(value, bool) and value is not None:
        return "true or false"
    for member in allowed:
        if typing.get_origin(member) is dict and isinstance(value, dict):
            inner = typing.get_args(member)[1]
            return next((f"{why} (at {key})" for key, item in value.items() if (why := _bool_mismatch(inner, item))),
                        None)
        if typing.get_origin(member) is list and isinstance(value, list):
            inner = typing.get_args(member)[0]
            return next((f"{why} (item {i})" for i, item in enumerate(value) if (why := _bool_mismatch(inner, item))),
                        None)
    return None


class Strict(BaseModel):
    # Unknown keys are errors, and so are inf and nan (a learning rate of .inf trains to nan).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_and_flags_keep_their_kind(cls, value, info):
        why = _bool_mismatch(cls.model_fields[info.field_name].annotation, value)
        if why:
            raise ValueError(f"must be {why}")
        return value


class TrainSettings(Strict):
    """LoRA fine-tuning settings. The defaults are the original project's (r=16, lr 2e-4, 3 epochs);
    the settings chosen on validation for the default run live in configs/default.yaml, which is
    also where `loracombench train` takes its defaults from."""

    r: int = Field(16, ge=1)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = None
    learning_rate: float = Field(2e-4, gt=0)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(256, ge=8)
    weight_decay: float = Field(0.0, ge=0)
    group_by_length: bool = True
    seed: int = Field(0, ge=0, le=MAX_SEED)
    # False: each task's LoRA starts from its own initialisation (seed derived from seed and task).
    shared_init: bool = False
    # Optimizer steps between checkpoints of the training state (0: never). On the default run a
    # step takes about 4 s on 2 CPU cores, while a checkpoint (the q/v LoRA and its AdamW moments,
    # about 11 MB) takes well under 0.1 s: every 10 steps costs under 1% and a kill loses at most
    # about 40 s of training. Does not change the result, so it is not part of any cache key.
    checkpoint_every: int = Field(10, ge=0)
    # Recompute every decoder layer's activations in the backward pass instead of keeping them:
    # for a machine short of memory. The adapter is bit-identical (dropout draws are replayed;
    # tested), so like checkpoint_every it is in no cache key. README "Memory" has its cost.
    gradient_checkpointing: bool = False
    # A micro-batch of more tokens than this (rows x longest row, padding included) recomputes
    # just enough decoder layers in the backward pass that the layers keeping their activations
    # hold no more than this many tokens' worth; smaller ones recompute nothing. Only the longest
    # batches pay, and only for the layers they must (README "Memory" has the peak and time
    # measured on the default run's longest rows). 512 keeps the default run under 4 GB; at 1024
    # GSM8K's longest batches alone took 4.2-4.4 GB. The same adapter; null: never recompute.
    recompute_above_tokens: int | None = Field(512, ge=1)
    # Project the target positions onto the vocabulary this many at a time, each chunk's logits
    # recomputed in the backward pass instead of kept (training.batch_loss_sum): a micro-batch
    # then holds one chunk's logits, not all of its targets' (on GSM8K's longest batches about
    # 1 GB less). The matrix products run on other shapes, so the gradients can differ in their
    # last bits and a result can move: unlike the two settings above it is in the cache key
    # when set. null: the model's own forward, as every committed result was trained.
    loss_chunk_tokens: int | None = Field(None, ge=1)

    def result_settings(self) -> dict:
        """The settings that decide the trained adapter (how it is checkpointed does not). An unset
        loss_chunk_tokens is left out, so that the keys of runs from before it existed hold."""
        exclude = {"checkpoint_every", "gradient_checkpointing", "recompute_above_tokens"}
        return self.model_dump(exclude=exclude | ({"loss_chunk_tokens"} if self.loss_chunk_tokens is None else set()))


class EvalSettings(Strict):
    split: str = "test"
    seed: int = Field(1234, ge=0, le=MAX_SEED)
    # None means the whole split.
    n_eval: dict[str, int | None] = Field(default_factory=lambda: {"ag_news": 200, "gsm8k": 60})
    n_generate: int | None = Field(30, ge=0)
    max_new_tokens: int = Field(256, ge=1)
    # Rows per log-likelihood forward pass. 8, not 16: the rows of a batch are padded to its longest,
    # and GSM8K's question+solution lengths vary widely, so on the default run's 60 rows a batch of
    # 16 is 25% padding (8: 11%) and scores in 29 s against 23.5 s; AG News is as fast at either.
    batch_size: int = Field(8, ge=1)
    generate_batch_size: int = Field(32, ge=1)

    @field_validator("split")
    @classmethod
    def _not_the_training_split(cls, value: str) -> str:
        if value == "train":  # the report would call training-set accuracy a test result
            raise ValueError("a run scores its models on held-out rows; train would score the experts on "
                             "rows they may have been trained on (use test, or validation where the task has one)")
        return value


PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=-]*$")


def check_plain_name(value: str, what: str) -> str:
    """A name that becomes a folder of the run: one path component, so that a config cannot
    place (and replace) folders outside the run folder."""
    if not PLAIN_NAME.match(value):
        raise ValueError(f"{what} {value!r} must be a plain name (letters, digits and _ . + = -, "
                         "not starting with . or -): it names a folder of the run")
    return value


class Labelled(Strict):
    """A method with parameters; its name is the label, else the method and its parameters."""

    method: str
    label: str | None = None

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        suffix = "".join(f"_{k}{v}" for k, v in sorted(self.params.items()))
        return f"{self.method}{suffix}"

    @model_validator(mode="after")
    def _name_is_a_folder_name(self) -> "Labelled":
        if self.label is not None:
            check_plain_name(self.label, "label")
        elif "/" in self.name or "\\" in self.name or self.name.startswith("."):
            raise ValueError(f"the name {self.name!r} made from the method and its parameters is not a plain "
                             "folder name; give the entry a label")
        return self


class MergeSpec(Labelled):
    weights: list[float] | None = None
    params: dict[str, float | int | str | bool] = Field(default_factory=dict)


class CompositionSpec(Labelled):
    """A composition other than a static merge (compose/: routers, weight searches, ...)."""

    params: dict[str, float | int | str | bool | list[float]] = Field(default_factory=dict)


class ExperimentConfig(Strict):
    name: str = "default"  # the run folder's default name, runs/<name>
    model: str = "smollm2-135m"
    trust_remote_code: bool = False
    device: str = "auto"
    # Forward-pass precision of training and evaluation: auto (bf16 on CUDA, fp32 on CPU), fp32,
    # bf16 (runs on CPU, but slowly without AVX-512 bf16) or fp16 (CUDA only).
    dtype: str = "auto"
    data_dir: str | None = None
    tasks: list[str] = Field(default_factory=lambda: ["ag_news", "gsm8k"])
    n_train: dict[str, int | None] = Field(default_factory=lambda: {"ag_news": 400, "gsm8k": 240})
    data_seed: int = Field(0, ge=0, le=MAX_SEED)
    # Each seed retrains the experts (LoRA initialisation, data order, dropout) and re-merges them;
    # the training sample (data_seed) and the evaluation sample stay fixed, so models pair up.
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    train: TrainSettings = Field(default_factory=TrainSettings)
    # Per-task changes to `train`, e.g. {gsm8k: {learning_rate: 2.0e-3}} where the validation
    # sweep chose different rates for different tasks.
    train_per_task: dict[str, dict] = Field(default_factory=dict)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    merges: list[MergeSpec] = Field(default_factory=lambda: [MergeSpec(method="average")])
    # Routers, weight searches, trained combinations (compose/); each declares what it needs.
    compositions: list[CompositionSpec] = Field(default_factory=list)
    # Labels of merges or compositions that every composed model is also paired-tested against,
    # beside the original's average and each expert (e.g. the best static merge).
    compare_with: list[str] = Field(default_factory=list)
    baselines: bool = True

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, name: str) -> str:
        return check_plain_name(name, "name")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"unknown or no tasks {unknown}; valid: {', '.join(sorted(TASKS))}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks repeat: {tasks}")
        return tasks

    @field_validator("dtype")
    @classmethod
    def _known_precision(cls, dtype: str) -> str:
        from .models import DTYPE_CHOICES

        if dtype not in DTYPE_CHOICES:
            raise ValueError(f"{dtype!r} is not a precision; valid: {', '.join(DTYPE_CHOICES)}")
        return dtype

    @model_validator(mode="after")
    def _precision_fits_device(self) -> "ExperimentConfig":
        if self.dtype == "fp16":  # the one precision a device can refuse
            from .models import ModelError, check_device, resolve_dtype

            try:
                resolve_dtype(self.dtype, check_device(self.device, "device"), "dtype")
            except ModelError as err:
                raise ValueError(str(err)) from None
        return self

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds) or any(not 0 <= s <= MAX_SEED for s in seeds):
            raise ValueError(f"seeds must be distinct integers from 0 to {MAX_SEED}, got {seeds}")
        return seeds

    def train_settings(self, task: str, seed: int) -> TrainSettings:
        """The training settings of one task's expert at one seed."""
        return TrainSettings.model_validate({**self.train.model_dump(), **self.train_per_task.get(task, {}),
                                             "seed": seed})

    @model_validator(mode="after")
    def _per_task_settings_are_valid(self) -> "ExperimentConfig":
        unknown = sorted(set(self.train_per_task) - set(self.tasks))
        if unknown:
            raise ValueError(f"train_per_task names tasks that are not run: {unknown}; tasks: {self.tasks}")
        for task, changes in self.train_per_task.items():
            if "seed" in changes:
                raise ValueError(f"train_per_task.{task}.seed: seeds are given by `seeds: [...]`")
            try:
                self.train_settings(task, self.seeds[0])
            except ValidationError as err:  # named by its full key, not as if it were train's
                problems = flatten_validation_error(err).split("; ")
                raise ValueError("; ".join(f"train_per_task.{task}.{problem}" for problem in problems)) from None
        return self

    @model_validator(mode="after")
    def _seed_given_once(self) -> "ExperimentConfig":
        if "seed" in self.train.model_fields_set:
            raise ValueError("train.seed is set per run by `seeds: [...]`; give the seeds there")
        return self

    @model_validator(mode="after")
    def _sizes_cover_tasks(self) -> "ExperimentConfig":
        for field, sizes in (("n_train", self.n_train), ("eval.n_eval", self.eval.n_eval)):
            missing = [t for t in self.tasks if t not in sizes]
            extra = [t for t in sizes if t not in self.tasks]
            if missing or extra:
                raise ValueError(f"{field} must give a size for exactly the tasks {self.tasks} "
                                 f"(missing {missing}, extra {extra})")
            if any(n is not None and n <= 0 for n in sizes.values()):
                raise ValueError(f"{field} sizes must be positive: {sizes}")
        from .merging import get_method, parse_params

        labels = [m.name for m in self.merges] + [c.name for c in self.compositions]
        if len(set(labels)) != len(labels):
            raise ValueError(f"merge and composition labels repeat: {labels}; give each a distinct label")
        unknown = [name for name in self.compare_with if name not in labels]
        if unknown:
            raise ValueError(f"compare_with names {unknown}, which this config does not merge or compose; "
                             f"valid: {', '.join(labels)}")
        from .compose import get_composition

        from .merging import MergeError
        from .merging.merge import checked_weights

        for index, spec in enumerate(self.compositions):
            try:
                get_composition(spec.method, spec.params)
            except ValueError as err:  # the entry's place in the file, where methods repeat
                raise ValueError(f"compositions.{index} ({spec.method}): {err}") from None
        for index, spec in enumerate(self.merges):
            try:
                method = get_method(spec.method)
                params = parse_params(method, spec.params)
            except MergeError as err:
                raise ValueError(f"merges.{index} ({spec.method}): {err}") from None
            try:
                weights = checked_weights(spec.weights, len(self.tasks))
                if method.check_weights:
                    method.check_weights(weights, params)
            except MergeError as err:
                raise ValueError(f"merges.{index}.weights ({spec.name}): {err}") from None
        return self


def load_config(path_or_preset: str | Path | None = None, overrides: dict | None = None) -> ExperimentConfig:
    """A preset name (configs/<name>.yaml) or a YAML path; None is the default preset."""
    source = path_or_preset or "default"
    path = Path(source)
    if not path.is_file():
        path = PRESETS_DIR / f"{source}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ValueError(f"no config file or preset {source!r}; presets: {', '.join(presets)}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file (expected YAML)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"{path}: not valid YAML ({problem}{at})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values, got {type(raw).__name__}")
    raw.update(overrides or {})
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(flatten_validation_error(err, str(path))) from None


def stable_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]
