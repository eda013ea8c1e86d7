"""ThroughputCallback: tokens/s, TFLOP/s and MFU of the training loop, logged like any metric."""

from __future__ import annotations

import math
import time
from collections import deque

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from lightning_llm.scaling import peak_flops, training_flops_per_token


def compute_dtype(trainer: Trainer) -> torch.dtype:
    """The dtype matmuls run in under the trainer's precision setting."""
    precision = str(getattr(trainer.precision_plugin, "precision", trainer.precision))
    if "bf16" in precision:
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def global_batch_tokens(trainer: Trainer, batch: dict[str, torch.Tensor]) -> int:
    """Positions in this step's batch summed over the data-parallel replicas (each rank sees its own batch)."""
    replicas = (getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}).get("num_replicas", 1)
    return batch["input_ids"].numel() * replicas


class TokenCounter:
    """The tokens each training batch adds, over the data-parallel replicas: the module's own count where it keeps
    one (`tokens_seen`: PretrainModule's leaves padding out and sums over the ranks), else the batch's positions."""

    def __init__(self) -> None:
        self._seen: int | None = None

    def start(self, pl_module: LightningModule) -> None:
        self._seen = getattr(pl_module, "tokens_seen", None)

    def step(self, trainer: Trainer, pl_module: LightningModule, batch: dict[str, torch.Tensor]) -> int:
        seen = getattr(pl_module, "tokens_seen", None)
        if seen is None or self._seen is None:
            return global_batch_tokens(trainer, batch)
        tokens, self._seen = seen - self._seen, seen
        return tokens


class ThroughputCallback(Callback):
    """Logs `perf/tokens_per_sec`, `perf/tflops` (model FLOPs, all devices) and, where a peak is known, `perf/mfu`.

    Tokens are those the model learns from: padding is not counted (a PretrainModule's `tokens_seen`). Model
    FLOPs per token come from `scaling.training_flops_per_token` for each batch's sequence length (6N plus the
    attention term, N the active parameters of a mixture of experts: its router and top-k experts, not all
    experts; a frozen weight, as under LoRA, 4 per parameter: it gets no weight gradient). Where they are not
    known (frozen weights in a mixture of experts) only tokens/s is logged, and the run says why;
    MFU divides the achieved FLOP/s by the peak dense FLOP/s of every device in the run. Rates are averaged
    over the last `window` batches so one slow step (a checkpoint, a validation) does not dominate. Without
    a peak (a CPU, a GPU or dtype not in `scaling.PEAK_FLOPS`) no MFU is logged, and the run says so.

    Args:
        window: number of recent batches the rates are averaged over.
        peak_flops: the peak dense FLOP/s of one device in the run's compute dtype; default: the data sheet's
            figure for a known GPU. Given, it is the one MFU divides by (on any device).
    """

    def __init__(self, window: int = 20, peak_flops: float | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if peak_flops is not None and (isinstance(peak_flops, bool) or not (isinstance(peak_flops, (int, float))
                                                                             and 0 < peak_flops < math.inf)):
            raise ValueError(f"peak_flops must be a finite number of FLOP/s > 0 (e.g. 989.4e12), got {peak_flops!r}")
        self.window = window
        self.peak_flops = peak_flops
        self._times: deque[float] = deque(maxlen=window + 1)
        self._tokens: deque[int] = deque(maxlen=window + 1)  # cumulative since the train start
        self._flops: deque[float] = deque(maxlen=window + 1)  # cumulative since the train start
        self._counter = TokenCounter()
        self._peak: float | None = None
        self._flops_unknown_said = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._times.clear()
        self._tokens.clear()
        self._flops.clear()
        self._counter.start(pl_module)
        self._flops_unknown_said = False
        dtype = compute_dtype(trainer)
        self._peak = self.peak_flops or peak_flops(pl_module.device, dtype)
        if self._peak is None:
            device = torch.cuda.get_device_name(pl_module.device) if pl_module.device.type == "cuda" else pl_module.device.type
            rank_zero_info(f"ThroughputCallback: no peak FLOP/s known for {device!r} in {dtype}, so perf/mfu is not "
                           "logged; pass ThroughputCallback(peak_flops=...) (one device's dense peak) to log it")

    def _sync(self, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        self._sync(pl_module)
        tokens = self._counter.step(trainer, pl_module, batch)
        per_token = training_flops_per_token(pl_module.model, batch["input_ids"].shape[-1])
        if per_token is None and not self._flops_unknown_said:
            self._flops_unknown_said = True
            rank_zero_info("ThroughputCallback: model FLOPs are not counted for a mixture of experts with frozen "
                           "weights or adapters, so perf/tflops and perf/mfu are not logged (tokens/s is)")
        flops = tokens * per_token if per_token is not None else math.nan
        self._times.append(time.perf_counter())
        self._tokens.append((self._tokens[-1] if self._tokens else 0) + tokens)
        self._flops.append((self._flops[-1] if self._flops else 0.0) + flops)
        if len(self._times) < 2:
            return
        elapsed = self._times[-1] - self._times[0]
        flops_per_sec = (self._flops[-1] - self._flops[0]) / elapsed
        metrics = {"perf/tokens_per_sec": (self._tokens[-1] - self._tokens[0]) / elapsed}
        if not math.isnan(flops_per_sec):
            metrics["perf/tflops"] = flops_per_sec / 1e12
            if self._peak is not None:
                metrics["perf/mfu"] = flops_per_sec / (self._peak * trainer.world_size)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)
