"""What makes a CPU decode step fast, for evaluation.greedy_tokens: linear layers computed
weight-first for the few rows a step has, and a key/value cache written into reserved room
instead of being concatenated at every step. Neither changes what is computed; both are
measured by `make bench` (generation) against one-by-one generate()."""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from transformers.cache_utils import DynamicCache, DynamicLayer


class FewRowLinear(TorchFunctionMode):
    """Every F.linear whose input has at most `max_rows` rows computed as (W·xᵀ)ᵀ instead of x·Wᵀ.

    A decode step multiplies a few rows (one new token per sequence) by every weight of the
    model. On CPU, MKL runs x·Wᵀ with 2-64 rows at a few GFLOP/s, and the same product with the
    weight on the left 1.5-4x faster (SmolLM2's lm_head with 4 rows: 33 ms against 9-12 ms);
    `make bench`'s generation section measures the effect end to end. It is the same product
    summed in another order, so logits move in the last bits (tested against F.linear)."""

    def __init__(self, max_rows: int = 64):
        super().__init__()
        self.max_rows = max_rows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            return self.linear(*args, **kwargs)
        return func(*args, **kwargs)

    def linear(self, x, weight, bias=None):
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not 0 < rows <= self.max_rows or weight.dim() != 2:
            return torch.nn.functional.linear(x, weight, bias)
        out = (weight @ x.reshape(rows, x.shape[-1]).t()).t().contiguous().reshape(*x.shape[:-1], weight.shape[0])
        return out if bias is None else out + bias


def few_row_linear(device: torch.device):
    """FewRowLinear on CPU; nothing elsewhere (GPU libraries choose well for few rows)."""
    return FewRowLinear() if device.type == "cpu" else contextlib.nullcontext()


class ReservedLayer(DynamicLayer):
    """transformers' DynamicLayer with room for `room` more positions reserved at its first update.

    DynamicLayer concatenates the whole cache with each new position, a copy of every key and
    value at every step (a tenth of a decode step on 2 cores). Here a step writes one position
    into the reserved room and attention reads a view of the filled part: the same keys and
    values. Past the room it grows as DynamicLayer does."""

    def __init__(self, room: int):
        super().__init__()
        self.room = room

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_room = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[-1])
        self.value_room = value_states.new_empty(*value_states.shape[:2], 0, value_states.shape[-1])
        self.filled = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.filled + key_states.shape[-2]
        if end > self.key_room.shape[-2]:
            self.key_room = self.grown(self.key_room, end)
            self.value_room = self.grown(self.value_room, end)
        self.key_room[:, :, self.filled: end] = key_states
        self.value_room[:, :, self.filled: end] = value_states
        self.show(end)
        return self.keys, self.values

    def grown(self, room: torch.Tensor, needed: int) -> torch.Tensor:
        larger = room.new_empty(*room.shape[:2], needed + self.room, room.shape[-1])
        larger[:, :, : self.filled] = room[:, :, : self.filled]
        return larger

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_room, self.value_room = self.key_room[indices], self.value_room[indices]
            self.show(self.filled)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.key_room = self.key_room.repeat_interleave(repeats, dim=0)
            self.value_room = self.value_room.repeat_interleave(repeats, dim=0)
            self.show(self.filled)

    def crop(self, tokens_to_remove: int) -> None:
        """As DynamicLayer.crop: a negative count drops that many positions from the end."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of positions to remove, got {tokens_to_remove}")
        if tokens_to_remove and self.is_initialized:
            self.show(max(self.filled + tokens_to_remove, 0))

    def show(self, filled: int) -> None:
        """Make the first `filled` positions of the room the layer's keys and values."""
        self.filled = filled
        self.keys, self.values = self.key_room[:, :, :filled], self.value_room[:, :, :filled]


def reserved_cache(config, room: int) -> DynamicCache | None:
    """The DynamicCache transformers would build for this model, its plain full-attention layers
    replaced by ReservedLayers; None (the model builds its own) when it has other kinds of layer
    (sliding windows, linear attention), whose caches are left to transformers."""
    cache = DynamicCache(config=config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [ReservedLayer(room) for _ in cache.layers]
    return cache
