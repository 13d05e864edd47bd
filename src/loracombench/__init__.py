"""LoRAComBench: train LoRA adapters per task, compose them, and measure the interference."""

__version__ = "0.1.0"
