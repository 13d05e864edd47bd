"""The only place that reads and writes PEFT adapters and our metadata beside them.

A saved adapter is a plain PEFT folder (adapter_config.json + adapter_model.safetensors) that
`PeftModel.from_pretrained` loads, plus loracombench.json: what it is, which base it belongs to
(fingerprint), how it was made. Weights are read from safetensors only.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import io
from .merging.factors import LoraFactors
from .models import cache_dir

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_FILE = "loracombench.json"
METADATA_SCHEMA = "loracombench.adapter/1"
_PEFT_PREFIX = "base_model.model."
_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


class AdapterError(ValueError):
    """An adapter folder that is unreadable, or used with the wrong base model."""


@dataclass
class Adapter:
    path: Path
    config: dict
    factors: dict[str, LoraFactors]  # module name (as in the base model) -> factors
    metadata: dict | None

    @property
    def fingerprint(self) -> dict | None:
        return (self.metadata or {}).get("base_model")

    @property
    def base_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")


def read_metadata(path: str | Path) -> dict | None:
    file = Path(path) / METADATA_FILE
    return io.read_json(file) if file.is_file() else None


def save_peft_model(peft_model, out_dir: str | Path, metadata: dict, extra_files: dict | None = None) -> Path:
    """Save a trained PeftModel and its metadata; the folder appears only once complete."""
    with io.atomic_dir(out_dir) as staging:
        peft_model.save_pretrained(staging, safe_serialization=True)
        _sort_module_sets(staging / CONFIG_FILE)
        for name, writer in (extra_files or {}).items():
            writer(staging / name)
        io.write_json(staging / METADATA_FILE, {"schema": METADATA_SCHEMA, **metadata})
    return Path(out_dir)


def _sort_module_sets(config_file: Path) -> None:
    """PEFT writes its set-valued module lists in set order, which string hashing randomises per
    process: the same adapter saved twice would differ in adapter_config.json, and downstream cache
    keys, which hash that file, would change with it. Sorted, as PEFT formats the file."""
    config = io.read_json(config_file)
    for key in ("target_modules", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    io.write_text(config_file, json.dumps(config, indent=2, sort_keys=True))


# ---------------------------------------------------------------- reading factors

def _pattern_value(pattern: dict, module: str, default):
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scale(config: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", rank))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def read_config(path: str | Path) -> dict:
    """The adapter's config, after checking the folder holds a LoRA adapter in safetensors."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise AdapterError(f"{path} is not a PEFT adapter folder ({CONFIG_FILE} missing)")
    if not (path / WEIGHTS_FILE).is_file():
        raise AdapterError(f"{path}: {WEIGHTS_FILE} missing (only safetensors weights are loaded)")
    config = io.read_json(path / CONFIG_FILE)
    if not isinstance(config, dict):
        raise AdapterError(f"{path / CONFIG_FILE}: expected a JSON object (a PEFT adapter config)")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: a {config.get('peft_type')} adapter, not LoRA")
    if config.get("use_dora"):
        raise AdapterError(f"{path}: DoRA adapters carry a magnitude vector and cannot be merged as LoRA factors")
    return config


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors; a truncated or garbage file raises one error that names it."""
    file = path / WEIGHTS_FILE
    try:
        return load_file(file)
    except Exception as err:  # safetensors raises its own types (SafetensorError, OSError, ...)
        raise AdapterError(f"{file}: not a readable safetensors file ({str(err).splitlines()[0]}); "
                           f"it is truncated or corrupt: recreate it (retrain or re-merge)") from None


def read_adapter(path: str | Path) -> Adapter:
    path = Path(path)
    config = read_config(path)
    tensors = read_weights(path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _FACTOR_KEY.match(key.removeprefix(_PEFT_PREFIX))
        if not match:
            raise AdapterError(f"{path}: unexpected tensor {key!r} (only LoRA A/B factors are supported)")
        pairs.setdefault(match["module"], {})[match["which"]] = tensor.float()
    factors = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{path}: module {module} lacks its lora_{'B' if 'A' in pair else 'A'} factor")
        rank = pair["A"].shape[0]
        factors[module] = LoraFactors(pair["A"], pair["B"], module_scale(config, module, rank))
    return Adapter(path=path, config=config, factors=factors, metadata=read_metadata(path))


# ---------------------------------------------------------------- base-model identity

def check_same_base(adapters: list[Adapter]) -> None:
    """Refuse adapters of different base models: fingerprints where recorded, else the config's name."""
    first = adapters[0]
    for other in adapters[1:]:
        if first.fingerprint and other.fingerprint:
            same = (first.fingerprint["config_hash"], first.fingerprint["weight_checksum"]) == (
                other.fingerprint["config_hash"], other.fingerprint["weight_checksum"])
            described = f"{first.fingerprint} vs {other.fingerprint}"
        else:
            same = first.base_name == other.base_name
            described = f"{first.base_name!r} vs {other.base_name!r}"
        if not same:
            raise AdapterError(f"{first.path} and {other.path} belong to different base models ({described})")


def check_adapter_base(path: str | Path, loaded) -> None:
    """Refuse to apply an adapter to a base model other than the one it was made for."""
    metadata = read_metadata(path)
    if metadata and metadata.get("base_model"):
        recorded = metadata["base_model"]
        if (recorded["config_hash"], recorded["weight_checksum"]) != (
                loaded.fingerprint["config_hash"], loaded.fingerprint["weight_checksum"]):
            raise AdapterError(
                f"{path} was made for base model {recorded['name']} ({recorded['config_hash']}/"
                f"{recorded['weight_checksum']}), not {loaded.name} ({loaded.fingerprint['config_hash']}/"
                f"{loaded.fingerprint['weight_checksum']})")
        return
    named = read_config(path).get("base_model_name_or_path")
    if named not in (loaded.name, loaded.path):
        raise AdapterError(f"{path} names base model {named!r}, not {loaded.name!r}")


# ---------------------------------------------------------------- writing merged factors

def write_factors(out_dir: str | Path, factors: dict[str, LoraFactors], template: dict, metadata: dict) -> Path:
    """Write factors as a PEFT adapter. Each module's scale is folded into lora_B and lora_alpha is
    set equal to its rank, so PEFT's scaling is exactly 1 whatever the inputs' alpha/r were."""
    folded = {module: f.folded() for module, f in factors.items()}
    ranks = {module: f.rank for module, f in folded.items()}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    odd = {re.escape(module): rank for module, rank in ranks.items() if rank != common}
    config = dict(template)
    config.update({
        "r": common, "lora_alpha": common, "use_rslora": False, "use_dora": False,
        "rank_pattern": odd, "alpha_pattern": dict(odd),
        # Exact module names: a union merge may cover modules that some inputs lacked.
        "target_modules": sorted(folded), "layers_to_transform": None, "layers_pattern": None,
        "inference_mode": True,
    })
    tensors = {}
    for module, f in folded.items():
        tensors[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = f.lora_A.float().contiguous()
        tensors[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = f.lora_B.float().contiguous()
    with io.atomic_dir(out_dir) as staging:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        io.write_json(staging / CONFIG_FILE, config)
        io.write_json(staging / METADATA_FILE, {"schema": METADATA_SCHEMA, **metadata})
    return Path(out_dir)


def apply_adapter(loaded, path: str | Path):
    """Wrap a loaded base model with a saved adapter, after checking they belong together."""
    from peft import PeftModel

    read_adapter(path)  # a readable LoRA adapter in safetensors, before PEFT reads anything
    check_adapter_base(path, loaded)
    return PeftModel.from_pretrained(loaded.model, str(path), is_trainable=False)


def merge_adapter_dirs(paths: list[str | Path], method: str, out_dir: str | Path,
                       weights: list[float] | None = None, params: dict | None = None,
                       extra_metadata: dict | None = None) -> dict:
    """Merge saved adapters with a registered method and save the result as a PEFT adapter.

    Needs only the adapter files. Every check (same base, shapes, ranks, parameters) runs
    before anything is written."""
    from .merging import MergeError, merge_modules

    if not paths:
        raise MergeError("the adapter list is empty: pass at least one adapter folder")
    loaded = [read_adapter(p) for p in paths]
    check_same_base(loaded)
    names = sorted(set().union(*(a.factors for a in loaded)))
    modules = {name: [a.factors.get(name) for a in loaded] for name in names}
    with _one_thread():
        merged, info = merge_modules(method, modules, weights, params)
    metadata = {
        "kind": "merge", "method": method, "base_model": loaded[0].fingerprint,
        "sources": [{"path": str(a.path), "task": (a.metadata or {}).get("task"),
                     "base_model": a.fingerprint} for a in loaded],
        "info": _summarised(info), **(extra_metadata or {}),
    }
    template = {k: v for k, v in loaded[0].config.items() if k not in ("auto_mapping",)}
    write_factors(out_dir, merged, template, metadata)
    return metadata


@contextlib.contextmanager
def _one_thread():
    """Merging works on many small matrices: a second thread costs more in synchronisation than
    it gains (TIES on SmolLM2-135M adapters: 1.8 s on one thread, 3.7 s on two; `make bench`)."""
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(previous)


def _summarised(info: dict) -> dict:
    """Per-module details can be long; keep scalars and summarise per-module rank maps."""
    summary = {}
    for key, value in info.items():
        if key == "output_ranks" and isinstance(value, dict):
            ranks = sorted(set(value.values()))
            summary["output_rank"] = ranks[0] if len(ranks) == 1 else {"min": ranks[0], "max": ranks[-1]}
        elif key != "per_module":
            summary[key] = value
    return summary


# ---------------------------------------------------------------- one base model per process

class SharedBase:
    """One loaded base model per process, lent out with an adapter folded into its weights and
    returned exactly as loaded. Evaluating N adapters then costs one load instead of N (a load
    of the embedded model takes about 5 s, a hub model's also re-hashes its weights), and a
    folded adapter costs no more per token than the base, where a full-rank merge kept as LoRA
    factors costs a second matmul per adapted module (`make bench`)."""

    def __init__(self, loaded, device=None, snapshot_dir: str | Path | None = None):
        self.loaded = loaded
        if device is not None:
            loaded.model.to(device)
        self._snapshot = WeightSnapshot(loaded.model, snapshot_dir)

    @contextlib.contextmanager
    def with_adapter(self, path: str | Path | None):
        """The base with the adapter at `path` folded in (W + scale·B·A), or the base for None."""
        try:
            if path is None:
                yield self.loaded.model
            else:
                yield apply_adapter(self.loaded, path).merge_and_unload()
        finally:
            self.restore()

    @contextlib.contextmanager
    def borrowed(self):
        """The LoadedModel itself, for a block that wraps it (training, a weight search)."""
        try:
            yield self.loaded
        finally:
            self.restore()

    def restore(self) -> None:
        """Unwrap any adapter layer a borrower left and put every weight back as loaded."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        model = self.loaded.model
        wrapped = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
        for name in wrapped:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, getattr(parent, child).get_base_layer())
        if hasattr(model, "peft_config"):  # PEFT leaves its config on the base it wrapped
            del model.peft_config
        self._snapshot.restore(model)
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()


class WeightSnapshot:
    """Every parameter's bytes as loaded, kept in an unlinked temporary file rather than in memory.

    A copy in memory would hold a second model for the life of the process (0.54 GB for
    SmolLM2-135M), on top of training's peak. The file lives in the cache folder (on disk, unlike
    a tmpfs /tmp), has no name, and goes with the process, even a killed one; restoring reads the
    bytes straight back into the parameters (from the page cache, about 0.35 s for that model on 2
    cores, less than copying from the clone took)."""

    def __init__(self, model: torch.nn.Module, folder: str | Path | None = None):
        self.file = self._open(Path(folder) if folder is not None else cache_dir())
        self.spans: dict[str, tuple[int, torch.Size, torch.dtype]] = {}
        for name, p in model.named_parameters():
            self.spans[name] = (self.file.tell(), p.shape, p.dtype)
            self.file.write(memoryview(_bytes_of(p.detach().cpu().contiguous())))
        self.file.flush()

    @staticmethod
    def _open(folder: Path):
        """A nameless file in `folder`; in the system's temporary folder if that cannot take one
        (a read-only cache), where it still works but may be memory (tmpfs)."""
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return tempfile.TemporaryFile(dir=folder)
        except OSError:
            return tempfile.TemporaryFile()

    def restore(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name not in self.spans or self.spans[name][1:] != (p.shape, p.dtype):
                    raise RuntimeError(f"the shared base's parameter {name} was replaced or reshaped by a borrower; "
                                       "it cannot be restored")
                in_place = p.device.type == "cpu" and p.is_contiguous()
                target = p.detach() if in_place else torch.empty(p.shape, dtype=p.dtype)
                self._read(self.spans[name][0], _bytes_of(target))
                if not in_place:
                    p.copy_(target)

    def _read(self, offset: int, into: np.ndarray) -> None:
        self.file.seek(offset)
        if self.file.readinto(memoryview(into)) != into.nbytes:
            raise RuntimeError("the shared base's weight snapshot is shorter than the weights it holds")


def _bytes_of(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's storage as bytes, shared with the tensor (no copy)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()
