"""lightning-llm: PyTorch Lightning plugins for training large language models."""

from lightning_llm.models import PRESETS, build_config, build_model

__all__ = ["PRESETS", "build_config", "build_model"]
__version__ = "0.1.0"
