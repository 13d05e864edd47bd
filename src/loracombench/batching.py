"""Left-padded batches, shared by training and scoring.

Left padding puts every row's continuation at the end, so a forward pass can compute the
vocabulary projection for the last few positions only (transformers' logits_to_keep). The
position ids count real tokens, so a padded row is computed exactly as if it stood alone.
"""

from __future__ import annotations

import random

import torch


def left_pad(sequences: list[list[int]], pad_id: int, device="cpu") -> dict[str, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random,
                           group: int = 16) -> list[list[int]]:
    """Shuffled batches of similar length, as transformers' group_by_length does: shuffle, sort
    within windows of `group` batches, cut, shuffle the batches. Less padding, same epoch."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * group
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start: start + window], key=lambda i: -lengths[i])
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
