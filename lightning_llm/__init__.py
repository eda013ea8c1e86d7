"""lightning-llm: PyTorch Lightning plugins for training large language models."""

from lightning_llm.callbacks.throughput import ThroughputCallback
from lightning_llm.data.pretrain import PretrainDataModule
from lightning_llm.data.sources import Source
from lightning_llm.models import PRESETS, build_config, build_model
from lightning_llm.modules.pretrain import PretrainModule
from lightning_llm.scaling import chinchilla_plan, flops_per_token

__all__ = [
    "PRESETS",
    "PretrainDataModule",
    "PretrainModule",
    "Source",
    "ThroughputCallback",
    "build_config",
    "build_model",
    "chinchilla_plan",
    "flops_per_token",
]
__version__ = "0.1.0"
