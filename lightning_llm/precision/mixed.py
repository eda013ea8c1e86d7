"""`MixedPrecision`: autocast to fp16 (with dynamic loss scaling) or bf16, fp32 weights and optimizer.

Compared with Lightning's own `MixedPrecision` this plugin
- does fp16 on every device torch autocasts (on CPU, Lightning turns "16-mixed" into bf16),
- agrees on overflow across all ranks before any rank steps (`DynamicLossScaler`),
- logs `precision/loss_scale`, `precision/skipped_steps` and `precision/overflow` through the
  LightningModule's `log`, so every logger of the trainer gets them,
- holds "step"-interval LR schedulers still on a skipped step (`HoldOnSkippedStep`),
- stops a run that skips `max_consecutive_skips` steps in a row, saying why.

Pass it in `plugins` (Lightning rejects plugin instances given as `precision=`):
`Trainer(plugins=[MixedPrecision("fp16-mixed")])`.
"""

from __future__ import annotations

import warnings
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any, Callable, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_info
from lightning.pytorch.plugins.precision import Precision
from torch import Tensor
from torch.optim import LBFGS, Optimizer

from lightning_llm.precision.loss_scaler import DynamicLossScaler, HoldOnSkippedStep

# Accepted spellings -> (Lightning's name for the precision, autocast dtype).
_PRECISIONS: dict[str, tuple[str, torch.dtype]] = {
    "fp16-mixed": ("16-mixed", torch.float16),
    "16-mixed": ("16-mixed", torch.float16),
    "bf16-mixed": ("bf16-mixed", torch.bfloat16),
}


def default_device_type() -> str:
    """The device type a run without an explicit one trains on: "cuda" when a GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_autocast(device: str, dtype: torch.dtype) -> None:
    """Raise ValueError unless `torch.autocast(device, dtype)` really autocasts here.

    torch only warns and disables autocast when a device or dtype is unsupported (e.g. "cuda" on a
    machine without a GPU); training would silently run in fp32, so the warning becomes an error.
    """
    try:
        available = torch.amp.is_autocast_available(device)
    except RuntimeError as err:
        raise ValueError(f"device={device!r} is not a torch device type (e.g. 'cuda', 'cpu')") from err
    if not available:
        raise ValueError(f"device={device!r}: torch has no autocast for it; use 'cuda' or 'cpu'")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            torch.autocast(device, dtype=dtype)
        except (RuntimeError, UserWarning) as err:
            raise ValueError(f"{dtype} autocast on device={device!r} is not possible here: {err}") from err


def check_positive(name: str, value: float, *, above: float = 0.0) -> None:
    """Raise ValueError naming `name` unless `value > above`."""
    if not value > above:
        raise ValueError(f"{name}={value!r}: must be > {above}")


class MixedPrecision(Precision):
    """Autocast the forward pass to fp16 or bf16; weights, gradients and optimizer stay fp32.

    Args:
        precision: "fp16-mixed" (alias "16-mixed"): fp16 autocast with dynamic loss scaling;
            "bf16-mixed": bf16 autocast, no scaling (bf16 has fp32's exponent range).
        device: device type to autocast on; default "cuda" when a GPU is visible, else "cpu".
        init_scale, growth_factor, backoff_factor, growth_interval: the loss scaler's parameters,
            with `torch.amp.GradScaler`'s defaults (fp16 only).
        max_consecutive_skips: stop with an error after this many skipped steps in a row (fp16 only):
            the default takes the scale from 2^16 down to 2^-16, where no loss scale can help.
    """

    def __init__(
        self,
        precision: Literal["fp16-mixed", "16-mixed", "bf16-mixed"] = "bf16-mixed",
        *,
        device: str | None = None,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        max_consecutive_skips: int = 32,
    ) -> None:
        if precision not in _PRECISIONS:
            raise ValueError(f"precision={precision!r}: expected one of {', '.join(map(repr, _PRECISIONS))}")
        self.precision, self.dtype = _PRECISIONS[precision]
        self.device = device or default_device_type()
        check_autocast(self.device, self.dtype)
        check_positive("init_scale", init_scale)
        check_positive("growth_factor", growth_factor, above=1.0)
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor={backoff_factor!r}: must be in (0, 1)")
        check_positive("growth_interval", growth_interval)
        check_positive("max_consecutive_skips", max_consecutive_skips)
        self.max_consecutive_skips = max_consecutive_skips
        self.scaler: DynamicLossScaler | None = None
        if self.dtype == torch.float16:
            self.scaler = DynamicLossScaler(self.device, init_scale=init_scale, growth_factor=growth_factor,
                                            backoff_factor=backoff_factor, growth_interval=growth_interval)
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.last_step_skipped = False

    def connect(self, model: torch.nn.Module, optimizers: list[Optimizer],
                lr_schedulers: list[Any]) -> tuple[torch.nn.Module, list[Optimizer], list[Any]]:
        param = next(model.parameters(), None)
        if param is not None:
            self.check_device(param.device.type)
        if self.scaler is not None:
            for optimizer in optimizers:
                check_scalable(optimizer)
            for config in lr_schedulers:
                if config.interval == "step" and not isinstance(config.scheduler, HoldOnSkippedStep):
                    config.scheduler = HoldOnSkippedStep(config.scheduler, lambda: self.last_step_skipped)
        return model, optimizers, lr_schedulers

    def check_device(self, device_type: str) -> None:
        """Raise ValueError unless the model trains on the device type this plugin autocasts."""
        if device_type != self.device:
            raise ValueError(f"MixedPrecision(device={self.device!r}) but the model is on {device_type!r}: "
                             f"pass device={device_type!r}")

    @contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        # cache_enabled=False: the cast weights would otherwise be cached across the forward passes of
        # activation checkpointing and gradient accumulation, pinning an fp16 copy of every weight.
        with torch.autocast(self.device, dtype=self.dtype, cache_enabled=False):
            yield

    def pre_backward(self, tensor: Tensor, module: pl.LightningModule) -> Tensor:  # type: ignore[override]
        if self.scaler is not None:
            tensor = self.scaler.scale(tensor)
        return super().pre_backward(tensor, module)

    def optimizer_step(self, optimizer: Optimizer, model: pl.LightningModule,  # type: ignore[override]
                       closure: Callable[[], Any], **kwargs: Any) -> Any:
        if self.scaler is None:
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        closure_result = closure()
        # In automatic optimization a training_step that returns None skipped backward: nothing to step.
        if closure_result is None and model.automatic_optimization:
            self._after_closure(model, optimizer)
            return closure_result
        # Unscale before the hooks so that on_before_optimizer_step and gradient clipping see true
        # gradients; this is also where the ranks agree on overflow.
        self.scaler.unscale_(optimizer)
        self._after_closure(model, optimizer)
        step_output = self.scaler.step(optimizer, **kwargs)
        skipped = self.scaler.found_inf(optimizer)
        self.scaler.update()
        self._record_step(model, skipped)
        return step_output

    def _record_step(self, model: pl.LightningModule, skipped: bool) -> None:
        assert self.scaler is not None
        self.last_step_skipped = skipped
        scale = self.scaler.get_scale()
        if skipped:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            rank_zero_info(f"fp16 overflow: optimizer step {model.trainer.global_step} skipped, "
                           f"loss scale backed off to {scale:g}")
        else:
            self.consecutive_skips = 0
        for name, value in (("loss_scale", scale), ("skipped_steps", self.skipped_steps), ("overflow", skipped)):
            model.log(f"precision/{name}", float(value), on_step=True, on_epoch=False)
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise RuntimeError(
                f"fp16 loss scaling skipped {self.consecutive_skips} optimizer steps in a row "
                f"(max_consecutive_skips={self.max_consecutive_skips}); the loss scale is down to {scale:g} and the "
                "gradients still hold inf/NaN, so the forward pass or the loss itself overflows fp16 or training "
                "diverged. Lower the learning rate, check the data, or train with 'bf16-mixed'."
            )

    def state_dict(self) -> dict[str, Any]:
        if self.scaler is None:
            return {}
        return {"scaler": self.scaler.state_dict(), "skipped_steps": self.skipped_steps,
                "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the loss scale and the count of clean steps; the growth and back-off options stay this run's.

        `GradScaler.load_state_dict` would put back the checkpoint's growth_factor, backoff_factor and
        growth_interval over the ones this plugin was given, and a count of clean steps at or past a
        smaller new interval would never equal it again (the scale would never grow): the count is cut
        to interval - 1, so the scale grows at the next clean step."""
        if self.scaler is None or not state_dict:
            return
        saved = dict(state_dict["scaler"])
        own = {"growth_factor": self.scaler.get_growth_factor(), "backoff_factor": self.scaler.get_backoff_factor(),
               "growth_interval": self.scaler.get_growth_interval()}
        changed = [f"{name} {saved[name]!r} -> {value!r}" for name, value in own.items() if saved.get(name) != value]
        saved.update(own, _growth_tracker=min(saved["_growth_tracker"], own["growth_interval"] - 1))
        self.scaler.load_state_dict(saved)
        rank_zero_info(f"fp16 loss scaling resumed at the checkpoint's scale {saved['scale']:g}"
                       + (f"; this run's options replace the checkpoint's: {', '.join(changed)}" if changed else ""))
        self.skipped_steps = state_dict["skipped_steps"]
        self.consecutive_skips = state_dict["consecutive_skips"]


def check_scalable(optimizer: Optimizer) -> None:
    """Raise ValueError for optimizers that cannot be stepped through a loss scaler here."""
    if isinstance(optimizer, LBFGS):
        raise ValueError("fp16-mixed: LBFGS re-evaluates the closure inside step, which a loss scaler cannot skip")
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        raise ValueError(
            f"fp16-mixed: {type(optimizer).__name__} unscales inside its (fused) step, so gradients cannot be "
            "clipped unscaled nor the overflow agreed across ranks first; create it with fused=False"
        )
