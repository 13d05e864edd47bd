"""The multi-task reference: one LoRA trained on the union of the tasks' training samples.

Not a composition of the experts but the point composition papers compare against (LoRA Soups'
data-mix baseline, Prabhakar et al. 2024, arXiv:2410.13025; LoraHub, whose target tasks are
unseen, compares with in-context learning and with fine-tuning on the target task's few examples
instead): what the same data and the same budget give when the tasks are known at training time.
It uses the experts' settings, with the rank (and lora_alpha, so that the scaling alpha/r stays
the experts') multiplied by `rank_factor`: at factor 2 it has as many parameters as the two
experts together."""

from __future__ import annotations

import shutil
from pathlib import Path

from .. import training
from ..config import stable_hash
from .base import BuildInputs, Composed, Composition, Needs, OneModel, check_params

ADAPTER_DIR = "adapter"


class Multitask(Composition):
    uses_target_loss = True
    name = "multitask"
    paper = "the multi-task (data-mix) baseline of LoRA Soups (arXiv:2410.13025)"

    def __init__(self, **params):
        self.params = check_params(self.name, params, {"rank_factor": 1})
        factor = self.params["rank_factor"]
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"composition 'multitask': rank_factor must be an integer >= 1, got {factor!r}")

    def needs(self) -> Needs:
        return Needs(training_data=True, gradients=True)

    def settings(self, inputs: BuildInputs):
        """The experts' settings at rank_factor times their rank. How activations are kept does not
        change an adapter (result_settings), so the tasks may differ there: the union's batches
        hold every task's rows, and get the most sparing of their memory settings."""
        every = list(inputs.train_settings.values())
        distinct = {stable_hash({k: v for k, v in s.result_settings().items() if k != "seed"}) for s in every}
        if len(distinct) != 1:
            raise ValueError("multitask training needs one set of training settings, but train_per_task gives "
                             f"the tasks {sorted(inputs.train_settings)} different ones")
        limits = [s.recompute_above_tokens for s in every if s.recompute_above_tokens is not None]
        factor = self.params["rank_factor"]
        return every[0].model_copy(update={
            "r": every[0].r * factor, "lora_alpha": every[0].lora_alpha * factor,
            "gradient_checkpointing": any(s.gradient_checkpointing for s in every),
            "recompute_above_tokens": min(limits) if limits else None})

    def loss_batches(self, inputs: BuildInputs, tokenizer) -> list:
        return training.loss_batches(tokenizer, training.multitask_rows(inputs.train_rows), self.settings(inputs))

    def build(self, inputs: BuildInputs, out_dir: Path) -> dict:
        if inputs.borrow_base is None or len(inputs.train_rows) < 2:
            raise ValueError("multitask needs the base model and the training rows of at least two tasks")
        # Trained in the cell's scratch folder, where a killed run's checkpoints are found again.
        target = (inputs.scratch or out_dir) / ADAPTER_DIR
        with inputs.borrow_base() as loaded:
            metadata = training.train_multitask_adapter(loaded, inputs.train_rows, self.settings(inputs), target,
                                               inputs.device, progress=inputs.progress, dtype=inputs.dtype)
        if target.parent != out_dir:
            shutil.copytree(target, out_dir / ADAPTER_DIR)
        return {key: metadata[key] for key in ("tasks", "n_train", "n_used", "train_time_s", "steps", "final_loss")
                if key in metadata}

    def load(self, out_dir: Path) -> Composed:
        return OneModel(out_dir / ADAPTER_DIR)
