"""lightning-llm: PyTorch Lightning plugins for training large language models.

The public names are imported on first use, so `import lightning_llm` stays cheap and a run that
never evaluates does not import lm-eval; a name whose module needs an extra that is not installed
(`lightning_llm.LightningLM` without lm-eval) raises the error that names the extra.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_llm.extras import OPTIONAL, require
from lightning_llm.strategies.names import register_with_lightning

_EXPORTS = {
    "PRESETS": "lightning_llm.models",
    "build_config": "lightning_llm.models",
    "build_model": "lightning_llm.models",
    "Source": "lightning_llm.data.sources",
    "PretrainDataModule": "lightning_llm.data.pretrain",
    "PretrainModule": "lightning_llm.modules.pretrain",
    "chinchilla_plan": "lightning_llm.scaling",
    "flops_per_token": "lightning_llm.scaling",
    "ThroughputCallback": "lightning_llm.callbacks.throughput",
    "export_module": "lightning_llm.export",
    "HFExport": "lightning_llm.callbacks.export",
    "RunSummary": "lightning_llm.callbacks.summary",
    "LLMRichProgressBar": "lightning_llm.callbacks.progress",
    "LLMTQDMProgressBar": "lightning_llm.callbacks.progress",
    "DivergenceGuard": "lightning_llm.divergence",
    "NonFiniteError": "lightning_llm.divergence",
    "MixedPrecision": "lightning_llm.precision",
    "MasterWeightsPrecision": "lightning_llm.precision",
    "LMEvalCallback": "lightning_llm.callbacks.benchmarks",
    "MMLUCallback": "lightning_llm.callbacks.benchmarks",
    "ARCChallengeCallback": "lightning_llm.callbacks.benchmarks",
    "GSM8KCallback": "lightning_llm.callbacks.benchmarks",
    "HumanEvalCallback": "lightning_llm.callbacks.benchmarks",
    "LightningLM": "lightning_llm.eval.lm_adapter",
    "run_python": "lightning_llm.eval.sandbox",
    "SandboxLimits": "lightning_llm.eval.sandbox",
    "pass_at_k": "lightning_llm.eval.code_eval",
    "flash_attention": "lightning_llm.attention",
    "FlashAttention": "lightning_llm.attention",
    "ParallelStrategy": "lightning_llm.strategies.parallel",
    "PipelineStrategy": "lightning_llm.strategies.parallel",
    "ZeROStrategy": "lightning_llm.strategies.zero",
    "InstructionDataModule": "lightning_llm.data.instruct",
    "InstructionTuningModule": "lightning_llm.modules.instruct",
    "LoRACallback": "lightning_llm.callbacks.lora",
    "QLoRACallback": "lightning_llm.callbacks.lora",
    "use_adapter": "lightning_llm.callbacks.lora",
    "merge_adapter": "lightning_llm.callbacks.lora",
    "save_adapter": "lightning_llm.callbacks.lora",
    "load_adapter": "lightning_llm.callbacks.lora",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"

register_with_lightning()  # Trainer(strategy="zero3"): the short names, in Lightning's StrategyRegistry


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_llm' has no attribute {name!r}")
    try:
        module = importlib.import_module(_EXPORTS[name])
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] in OPTIONAL:  # the module needs an extra that is not installed
            require(err.name, f"lightning_llm.{name}")
        raise
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
