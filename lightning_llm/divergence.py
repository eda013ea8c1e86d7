"""The divergence guard: a non-finite loss or gradient norm never becomes a weight, a checkpoint or an export.

`DivergenceGuard` is a callback that every `PretrainModule` brings with it (`on_nonfinite`), and that
any LightningModule can use. After backward, before the optimizer step, every rank checks the losses
it backpropagated since the last step and its gradients' norm; one all-reduce makes the verdict the
same on every rank (data-parallel replicas, pipeline stages, ZeRO shards), so all ranks stop or skip
together. Then:
- "stop" (the default) raises `NonFiniteError`, naming the step, the values and the last checkpoint
  (all checkpoints written so far are finite: the guard ran before every step); the bad step is not
  applied, and since the run ends with an error, nothing after it (a checkpoint, the CLI's export) runs;
- "skip" drops the step's gradients, so the optimizer updates nothing (as an fp16 overflow does), holds
  "step"-interval LR schedules still (`HoldOnSkippedStep`), and stops after `max_nonfinite_skips` in a row.

Under a precision plugin with a loss scaler (fp16), a non-finite gradient is an overflow that the scaler
skips and backs off from; the guard then checks the loss only.

Weights can still turn non-finite with a finite loss and gradient (changed outside the optimizer step, an
update that overflows): the guard also checks every checkpoint's weights before Lightning writes it (every
rank its own shards, one verdict), and refuses one that holds inf or NaN with `NonFiniteError`, so that
`last.ckpt` and the best checkpoint keep their finite version.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_llm.checkpoint import describe_nonfinite, nonfinite_weights
from lightning_llm.precision.loss_scaler import HoldOnSkippedStep, any_rank

ON_NONFINITE = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient norm and stopped before applying it."""


def gradient_norm(params: Iterable[Tensor]) -> Tensor | None:
    """The 2-norm of the parameters' gradients (over all shards for DTensor gradients); None without gradients."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def has_loss_scaler(precision_plugin: Any) -> bool:
    """Whether the precision plugin skips steps with non-finite gradients itself (fp16 loss scaling)."""
    scaler = getattr(precision_plugin, "scaler", None)
    return scaler is not None and scaler.is_enabled()


def last_checkpoint(trainer: pl.Trainer) -> str | None:
    """The newest checkpoint the trainer's checkpoint callbacks wrote in this run, if any."""
    for callback in trainer.checkpoint_callbacks:
        path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        if path:
            return path
    return None


class DivergenceGuard(Callback):
    """Stop (or skip the step) when a loss or the gradient norm is inf or NaN, on every rank alike.

    Args:
        on_nonfinite: "stop" raises `NonFiniteError` before the bad step is applied; "skip" drops the
            step (no update, no LR schedule step) and stops after `max_nonfinite_skips` skipped steps in a row.
        max_nonfinite_skips: with "skip", the number of consecutive skipped steps that ends the run.
        log_grad_norm: log the gradient norm it computes as `train/grad_norm`.
    """

    def __init__(self, on_nonfinite: Literal["stop", "skip"] = "stop", max_nonfinite_skips: int = 16,
                 log_grad_norm: bool = True) -> None:
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite={on_nonfinite!r}: expected one of {', '.join(map(repr, ON_NONFINITE))}")
        if not isinstance(max_nonfinite_skips, int) or max_nonfinite_skips < 1:
            raise ValueError(f"max_nonfinite_skips={max_nonfinite_skips!r}: must be a positive integer")
        self.on_nonfinite, self.max_nonfinite_skips, self.log_grad_norm = on_nonfinite, max_nonfinite_skips, log_grad_norm
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.last_step_skipped = False
        self._bad_loss: Tensor | None = None  # the first non-finite loss since the last step (kept on device: no sync per micro-batch)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on_nonfinite == "skip":
            for config in trainer.lr_scheduler_configs:
                if config.interval == "step":
                    config.scheduler = HoldOnSkippedStep(config.scheduler, lambda: self.last_step_skipped)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        loss = loss.detach().float()
        if self._bad_loss is None:
            self._bad_loss = torch.full_like(loss, 0.0)
        # Keep the first non-finite value seen in this step (a finite one leaves it at 0).
        self._bad_loss = torch.where((self._bad_loss == 0) & ~torch.isfinite(loss), loss, self._bad_loss)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer) -> None:
        norm = gradient_norm(pl_module.parameters())
        if norm is not None and self.log_grad_norm:
            pl_module.log("train/grad_norm", norm)
        bad_loss = self._bad_loss if self._bad_loss is not None else torch.zeros((), device=pl_module.device)
        self._bad_loss = None
        check_norm = norm is not None and not has_loss_scaler(trainer.precision_plugin)
        local = torch.stack([
            (bad_loss != 0).float(),
            (~torch.isfinite(norm)).float().to(bad_loss.device) if check_norm else torch.zeros((), device=bad_loss.device),
        ])
        flags = any_rank(local)
        if not bool(flags.any()):
            self.last_step_skipped = False
            self.consecutive_skips = 0
            return
        what = self._describe(flags, bad_loss, norm)
        if self.on_nonfinite == "stop":
            raise NonFiniteError(self._stop_message(trainer, f"{what} at step {trainer.global_step}"))
        # Skip: without gradients the optimizer updates nothing (and a precision plugin with fp32
        # masters hands them nothing); the model's and the optimizer's own parameters can differ
        # (ZeRO-1 shards, master weights), so both are cleared.
        pl_module.zero_grad(set_to_none=True)
        optimizer.zero_grad(set_to_none=True)
        self.last_step_skipped = True
        self.skipped_steps += 1
        self.consecutive_skips += 1
        pl_module.log("train/nonfinite_skips", float(self.skipped_steps))
        rank_zero_warn(f"{what}: optimizer step {trainer.global_step} skipped ({self.consecutive_skips} in a row)")
        if self.consecutive_skips >= self.max_nonfinite_skips:
            raise NonFiniteError(self._stop_message(
                trainer, f"{self.consecutive_skips} optimizer steps in a row skipped (max_nonfinite_skips={self.max_nonfinite_skips}), "
                         f"the last one for {what} at step {trainer.global_step}"))

    @staticmethod
    def _describe(flags: Tensor, bad_loss: Tensor, norm: Tensor | None) -> str:
        parts = []
        if flags[0]:
            value = bad_loss.item()
            parts.append(f"loss {value}" if not math.isfinite(value) else "loss non-finite on another rank")
        if flags[1]:
            value = norm.item() if norm is not None else math.nan
            parts.append(f"gradient norm {value}" if not math.isfinite(value) else "gradient norm non-finite on another rank")
        return "non-finite " + " and ".join(parts)

    def _stop_message(self, trainer: pl.Trainer, what: str) -> str:
        checkpoint = last_checkpoint(trainer)
        lr = f" (lr {trainer.optimizers[0].param_groups[0]['lr']:g})" if trainer.optimizers else ""
        where = (f"the last checkpoint, {checkpoint}, is finite (it was written before this step)" if checkpoint
                 else "no checkpoint was written in this run")
        remedy = ("pass on_nonfinite='skip' to skip such steps" if self.on_nonfinite == "stop"
                  else f"raise max_nonfinite_skips (now {self.max_nonfinite_skips})")
        return (f"training diverged: {what}{lr}; the step was not applied, so no non-finite weights were saved or "
                f"exported; {where}. Lower the learning rate, check the data, or {remedy}.")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Weights can turn non-finite without a non-finite loss or gradient (changed outside the optimizer
        # step, an update that overflows): such a checkpoint is refused before it is written (Lightning calls
        # this hook before its CheckpointIO), so `last.ckpt` and the best one keep their finite version.
        bad = nonfinite_weights(checkpoint.get("state_dict", {}))
        if not bool(any_rank(torch.tensor([float(bool(bad))], device=pl_module.device)).item()):
            return
        what = describe_nonfinite(bad) if bad else "weight tensors on another rank hold inf or NaN"
        previous = last_checkpoint(trainer)
        where = f"the last checkpoint, {previous}, is finite" if previous else "no checkpoint was written in this run"
        raise NonFiniteError(f"refusing to save the checkpoint of step {trainer.global_step}: {what}; nothing was "
                             f"written, {where}. The weights became non-finite without a non-finite loss or gradient "
                             "norm (changed outside the optimizer step, or an update that overflowed)")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = state_dict.get("skipped_steps", 0)
        self.consecutive_skips = state_dict.get("consecutive_skips", 0)
