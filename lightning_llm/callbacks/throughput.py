"""ThroughputCallback: tokens/s, TFLOP/s and MFU of the training loop, logged like any metric."""

from __future__ import annotations

import time
from collections import deque

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_llm.scaling import flops_per_token, peak_flops


def compute_dtype(trainer: Trainer) -> torch.dtype:
    """The dtype matmuls run in under the trainer's precision setting."""
    precision = str(getattr(trainer.precision_plugin, "precision", trainer.precision))
    if "bf16" in precision:
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def global_batch_tokens(trainer: Trainer, batch: dict[str, torch.Tensor]) -> int:
    """Tokens in this step's batch summed over the data-parallel replicas (each rank sees its own batch)."""
    replicas = (getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}).get("num_replicas", 1)
    return batch["input_ids"].numel() * replicas


class ThroughputCallback(Callback):
    """Logs `perf/tokens_per_sec`, `perf/tflops` (model FLOPs, all devices) and, on known GPUs, `perf/mfu`.

    Model FLOPs per token come from `scaling.flops_per_token` (6N plus the attention term, N the active
    parameters of a mixture of experts: its router and top-k experts, not all experts); MFU divides
    the achieved FLOP/s by the peak dense FLOP/s of every device in the run. Rates are averaged over
    the last `window` batches so one slow step (a checkpoint, a validation) does not
    dominate. On CPUs no peak is known: tokens/s and TFLOP/s only.

    Args:
        window: number of recent batches the rates are averaged over.
    """

    def __init__(self, window: int = 20) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self._times: deque[float] = deque(maxlen=window + 1)
        self._tokens: deque[int] = deque(maxlen=window + 1)
        self._flops_per_token: float | None = None
        self._peak: float | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._times.clear()
        self._tokens.clear()
        self._peak = peak_flops(pl_module.device, compute_dtype(trainer))

    def _sync(self, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        self._sync(pl_module)
        input_ids = batch["input_ids"]
        if self._flops_per_token is None:
            self._flops_per_token = flops_per_token(pl_module.model.config, input_ids.shape[-1])
        total = (self._tokens[-1] if self._tokens else 0) + global_batch_tokens(trainer, batch)
        self._times.append(time.perf_counter())
        self._tokens.append(total)
        if len(self._times) < 2:
            return
        elapsed = self._times[-1] - self._times[0]
        tokens_per_sec = (self._tokens[-1] - self._tokens[0]) / elapsed
        flops_per_sec = tokens_per_sec * self._flops_per_token
        metrics = {"perf/tokens_per_sec": tokens_per_sec, "perf/tflops": flops_per_sec / 1e12}
        if self._peak is not None:
            metrics["perf/mfu"] = flops_per_sec / (self._peak * trainer.world_size)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)
