"""Time merge_modules for every registered method on adapters shaped like SmolLM2-135M's.

Two synthetic adapters (seeded), 30 layers × q_proj (576 → 576) and v_proj (576 → 192),
r = 16, lora_alpha = 32; each method runs with its default parameters, and core_space also
with each of its other inner merges; median of 3 runs. `make bench` runs this as the merge
section of benchmarks/bench.py; on its own:

    python benchmarks/bench_merge.py [--out benchmarks/results/merge_timing.json] [--merge-repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits  # installed with scikit-learn, a dependency

from loracombench import io
from loracombench.merging import METHODS, merge_modules
from loracombench.merging.core_space import INNER_METHODS
from loracombench.merging.factors import LoraFactors

LAYERS = 30
HIDDEN = 576
KV_OUT = 192
RANK = 16
ALPHA = 32
DEFAULT_OUT = Path(__file__).parent / "results" / "merge_timing.json"


def synthetic_adapter(generator: torch.Generator, layers: int = LAYERS) -> dict[str, LoraFactors]:
    """One adapter, factors at the magnitudes a trained LoRA of this size roughly has."""
    shapes = {"q_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, KV_OUT)}
    adapter = {}
    for layer in range(layers):
        for projection, (in_features, out_features) in shapes.items():
            lora_A = torch.randn(RANK, in_features, generator=generator) / in_features**0.5
            lora_B = torch.randn(out_features, RANK, generator=generator) * 0.01
            adapter[f"model.layers.{layer}.self_attn.{projection}"] = LoraFactors(lora_A, lora_B, ALPHA / RANK)
    return adapter


def synthetic_modules(adapters: int = 2, seed: int = 0, layers: int = LAYERS) -> dict[str, list[LoraFactors]]:
    generator = torch.Generator().manual_seed(seed)
    built = [synthetic_adapter(generator, layers) for _ in range(adapters)]
    return {name: [adapter[name] for adapter in built] for name in built[0]}


def cases() -> dict[str, tuple[str, dict]]:
    """Row label -> (method, params): every method at its defaults, core_space with every inner merge."""
    rows = {name: (name, {}) for name in METHODS}
    default_inner = next(p.default for p in METHODS["core_space"].params if p.name == "merge")
    rows.update({f"core_space(merge={inner})": ("core_space", {"merge": inner})
                 for inner in INNER_METHODS if inner != default_inner})
    return rows


def time_method(name: str, params: dict, modules: dict, repeats: int) -> float:
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        merge_modules(name, modules, params=params)
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def merge_timing(repeats: int = 3, threads: int = 1, layers: int = LAYERS) -> dict:
    """{"setup": ..., "seconds": {row label: median seconds}} for every case."""
    modules = synthetic_modules(layers=layers)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            seconds = {label: time_method(name, params, modules, repeats) for label, (name, params) in cases().items()}
    finally:
        torch.set_num_threads(previous)
    setup = {"layers": layers, "modules": len(modules), "adapters": 2, "rank": RANK, "lora_alpha": ALPHA,
             "shapes_out_in": {"q_proj": [HIDDEN, HIDDEN], "v_proj": [KV_OUT, HIDDEN]},
             "repeats": repeats, "statistic": "median", "torch_threads": threads, "torch": torch.__version__}
    return {"setup": setup, "seconds": seconds}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--merge-repeats", type=int, default=3, help="runs per method; the median is reported")
    parser.add_argument("--merge-threads", type=int, default=1,
                        help="threads for torch and the BLAS/LAPACK under scipy (default 1: the matrices are "
                             "small, and spinning threads on a shared CPU cost far more than they gain)")
    parser.add_argument("--merge-layers", type=int, default=LAYERS,
                        help=f"decoder layers of the synthetic adapters (default {LAYERS}, SmolLM2-135M's)")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON table")
    add_arguments(parser)
    args = parser.parse_args(argv)
    payload = merge_timing(args.merge_repeats, args.merge_threads, args.merge_layers)
    print(f"{'method':<26}{'seconds':>10}")
    for name, value in payload["seconds"].items():
        print(f"{name:<26}{value:>10.3f}")
    io.write_json(args.out, payload)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
