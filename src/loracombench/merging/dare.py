"""DARE: Yu, Yu, Yu, Huang, Li 2024, "Language Models are Super Mario: Absorbing Abilities from
Homologous Models as a Free Lunch", arXiv 2311.03099.

Drop And REscale: each entry of each task update τᵢ = wᵢΔWᵢ is kept with probability `density`
(= 1 - the paper's drop rate p) and the kept entries are divided by `density`, so E[τ̃ᵢ] = τᵢ.
Then:
- dare_linear sums the τ̃ᵢ (DARE before task arithmetic);
- dare_ties elects signs and takes the disjoint mean of the τ̃ᵢ, as TIES does, without TIES'
  magnitude trimming (the random drop replaces it).
The drop makes the update full rank, so it is stored exactly by default (rank=0, see dense.py):
only then is the merged update still an unbiased estimate of the undropped one. A positive `rank`
keeps its best rank-k approximation, with the relative error in info.

Default density 0.5 (drop rate 0.5): the paper finds drop rates of 0.9 and more harmless for
the full fine-tuning deltas of large models; nothing shows the same for the LoRA updates of a
135M-parameter model, so the default is milder.

Randomness: each module gets its own torch.Generator seeded with the CRC-32 of "`seed`:module
name", so same-shaped modules do not share masks and a module's masks do not depend on which
other modules are merged.
"""

from __future__ import annotations

import zlib

import torch

from loracombench.merging import params as shared
from loracombench.merging.dense import refactorise, weighted_updates
from loracombench.merging.factors import LoraFactors
from loracombench.merging.ops import random_drop, sign_consensus_mean
from loracombench.merging.registry import MergeMethod, register

REFERENCE = ("Yu, Yu, Yu, Huang, Li 2024, 'Language Models are Super Mario: Absorbing Abilities from "
             "Homologous Models as a Free Lunch', arXiv 2311.03099")


def module_generator(seed: int, module: str) -> torch.Generator:
    generator = torch.Generator()
    # One 32-bit value: the CPU generator (MT19937) ignores the upper half of a 64-bit seed.
    generator.manual_seed(zlib.crc32(f"{seed}:{module}".encode("utf-8")))
    return generator


def dropped_updates(factors: list[LoraFactors], weights: list[float], params: dict, module: str) -> torch.Tensor:
    generator = module_generator(params["seed"], module)
    tasks = weighted_updates(factors, weights)
    return torch.stack([random_drop(task, params["density"], generator) for task in tasks])


def merge_dare_linear(factors: list[LoraFactors], weights: list[float], params: dict, module: str):
    merged = dropped_updates(factors, weights, params, module).sum(dim=0)
    return refactorise(merged, params["rank"])


def merge_dare_ties(factors: list[LoraFactors], weights: list[float], params: dict, module: str):
    merged = sign_consensus_mean(dropped_updates(factors, weights, params, module), params["sign_mode"])
    return refactorise(merged, params["rank"])


_DENSITY = shared.density(0.5, "probability of keeping each entry (1 - drop rate)")
_RANK = shared.rank("output rank; 0 = exact (full-rank factors), k > 0 = best rank-k approximation")

register(MergeMethod(
    name="dare_linear",
    fn=merge_dare_linear,
    params=(_DENSITY, shared.seed(), _RANK),
    reference=REFERENCE,
    summary="random drop with 1/density rescale, then Σ; exact by default, rank=k compresses",
    averages=False,
    needs_equal_ranks=False,
    takes_union_of_modules=True,
))

register(MergeMethod(
    name="dare_ties",
    fn=merge_dare_ties,
    params=(_DENSITY, shared.sign_mode(), shared.seed(), _RANK),
    reference=REFERENCE + "; sign election and disjoint merge from Yadav et al. 2023, arXiv 2306.01708",
    summary="random drop with 1/density rescale, then TIES sign election and disjoint mean; exact by default, rank=k compresses",
    averages=True,
    needs_equal_ranks=False,
    takes_union_of_modules=True,
))
