"""The one data type that merge methods exchange: a LoRA module's factors and its scaling."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraFactors:
    """One adapted module: ΔW = scale · lora_B @ lora_A.

    lora_A has shape (r, in_features) and lora_B (out_features, r), in PEFT's own layout for
    both nn.Linear and GPT-2's Conv1D (PEFT transposes ΔW for Conv1D at use time, not in storage).
    scale is PEFT's lora_alpha / r (or lora_alpha / sqrt(r) under rsLoRA).
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A)

    def folded(self) -> "LoraFactors":
        """The same update with the scale moved into lora_B, so that scale is 1."""
        return LoraFactors(self.lora_A, self.scale * self.lora_B, 1.0)
