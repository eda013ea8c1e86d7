"""Precision plugins: fp16 with dynamic loss scaling, bf16, bf16 weights with fp32 master copies."""

from lightning_llm.precision.loss_scaler import DynamicLossScaler, HoldOnSkippedStep
from lightning_llm.precision.master_weights import MasterWeightsPrecision
from lightning_llm.precision.mixed import MixedPrecision

__all__ = ["DynamicLossScaler", "HoldOnSkippedStep", "MasterWeightsPrecision", "MixedPrecision"]
