"""`MasterWeightsPrecision`: bf16 weights, activations and gradients; fp32 master weights in the optimizer.

bf16 keeps fp32's exponent range but only 8 significant bits: a weight near 1.0 cannot move by less
than 2^-8, so with small learning rates most updates round away and pure-bf16 training stalls. Here
the optimizer holds an fp32 master copy of every trainable bf16 parameter, steps it in fp32 and
copies it back (rounded) to the model. Memory per parameter Ψ: 2 (bf16 weights) + 2 (bf16 gradients)
+ 12 (fp32 master, Adam's two moments), the layout that ZeRO partitions; at the step the gradients
are converted to fp32 one tensor at a time, freeing each bf16 gradient as its fp32 copy is made.

Only parameters that the optimizer holds and that require grad get masters, so with LoRA/QLoRA only
the adapters do; frozen (or quantized) weights stay as they are.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import HalfPrecision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import Tensor
from torch.optim import Optimizer

_MASTER_KEY = "fp32_master_weight"


class MasterWeightsPrecision(HalfPrecision):
    """bf16 model (weights, activations, gradients) trained through fp32 master weights.

    Built on Lightning's `HalfPrecision("bf16-true")`, which casts the model and the floating-point
    inputs to bf16; this plugin adds the fp32 master copies to each optimizer in `connect`. The
    masters are saved with the optimizer's state (key `fp32_master_weight` per parameter), so a
    resumed run continues from the fp32 values, not from the rounded bf16 weights. A strategy that
    writes sharded checkpoints keyed by parameter name (ZeROStrategy) saves the masters in place of
    the weights instead, through `master_weights` and `copy_masters_to_weights`.

    Args:
        precision: "bf16" (alias "bf16-true"), the dtype of the model's weights.
    """

    def __init__(self, precision: Literal["bf16", "bf16-true"] = "bf16") -> None:
        if precision not in ("bf16", "bf16-true"):
            raise ValueError(f"precision={precision!r}: expected 'bf16' (alias 'bf16-true'); for fp16 use "
                             "MixedPrecision('fp16-mixed'), which keeps fp32 weights and scales the loss")
        super().__init__("bf16-true")
        # id(optimizer) -> [(model parameter, its fp32 master)]
        self._masters: dict[int, list[tuple[Tensor, Tensor]]] = {}
        # id(optimizer) -> {state_dict index: saved master}, between load_state_dict's pre and post hooks
        self._saved_masters: dict[int, dict[int, Tensor]] = {}

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """The model in bf16, but for its non-persistent floating buffers (rotary embeddings' `inv_freq`):
        constants that checkpoints and exports do not hold, which transformers keeps in fp32 (a model loaded
        with `from_pretrained(..., dtype=torch.bfloat16)` has them in fp32). Lightning's bf16-true casts them
        too: `inv_freq` rounded to bf16 (up to 2^-9 relative) moves the rotary angle at position 512 by up to
        0.09 rad, so the model trained and evaluated here differed from its export."""
        constants = [(sub, name, buffer) for sub in module.modules() for name, buffer in sub._buffers.items()
                     if buffer is not None and buffer.is_floating_point() and name in sub._non_persistent_buffers_set]
        module = super().convert_module(module)
        for sub, name, buffer in constants:
            sub.register_buffer(name, buffer, persistent=False)
        return module

    def connect(self, model: torch.nn.Module, optimizers: list[Optimizer],
                lr_schedulers: list[Any]) -> tuple[torch.nn.Module, list[Optimizer], list[Any]]:
        for optimizer in optimizers:
            self._attach_masters(optimizer)
        return model, optimizers, lr_schedulers

    def _attach_masters(self, optimizer: Optimizer) -> None:
        """Replace each trainable bf16 parameter in the optimizer's groups by an fp32 master copy."""
        pairs = []
        for group in optimizer.param_groups:
            for i, param in enumerate(group["params"]):
                if param.requires_grad and param.dtype == self._desired_input_dtype:
                    master = param.detach().to(torch.float32).requires_grad_(True)
                    group["params"][i] = master
                    pairs.append((param, master))
        if not pairs:
            return
        self._masters[id(optimizer)] = pairs
        optimizer.register_state_dict_post_hook(self._save_masters)
        optimizer.register_load_state_dict_pre_hook(self._take_saved_masters)
        optimizer.register_load_state_dict_post_hook(self._load_masters)

    def master_weights(self, optimizer: Optimizer) -> list[tuple[Tensor, Tensor]]:
        """(model weight, its fp32 master) for every tensor that `optimizer` steps through a master.

        A strategy that keys the optimizer state by parameter name (ZeROStrategy's sharded
        checkpoints) uses this to find the names of the masters, which stand in for the weights."""
        return list(self._masters.get(id(optimizer), ()))

    def copy_masters_to_weights(self, optimizer: Optimizer) -> None:
        """Round each fp32 master into its bf16 model weight (after a step, or after loading the masters)."""
        with torch.no_grad():
            for param, master in self._masters.get(id(optimizer), ()):
                param.copy_(master)

    def _master_indices(self, optimizer: Optimizer) -> dict[int, Tensor]:
        """Index in the optimizer's state_dict (params numbered in group order) -> fp32 master."""
        masters = {id(master) for _, master in self._masters.get(id(optimizer), ())}
        params = [param for group in optimizer.param_groups for param in group["params"]]
        return {index: param for index, param in enumerate(params) if id(param) in masters}

    def _save_masters(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        # The per-parameter dicts are the optimizer's live state: build new ones instead of adding a key.
        state = dict(state_dict["state"])
        for index, master in self._master_indices(optimizer).items():
            state[index] = {**state.get(index, {}), _MASTER_KEY: master.detach()}
        return {**state_dict, "state": state}

    def _take_saved_masters(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        # Taken out before torch loads the state: optimizers such as Adam expect a non-empty
        # per-parameter state to hold their own keys ("step", ...), which a not-yet-stepped one lacks.
        state, saved = {}, {}
        for index, param_state in state_dict["state"].items():
            param_state = dict(param_state)
            if _MASTER_KEY in param_state:
                saved[index] = param_state.pop(_MASTER_KEY)
            if param_state:
                state[index] = param_state
        self._saved_masters[id(optimizer)] = saved
        return {**state_dict, "state": state}

    def _load_masters(self, optimizer: Optimizer) -> None:
        saved = self._saved_masters.pop(id(optimizer), {})
        with torch.no_grad():
            for index, master in self._master_indices(optimizer).items():
                if index in saved:
                    master.copy_(saved[index])

    def _clip_gradients(self, model: pl.LightningModule | torch.nn.Module, optimizer: Optimizer,
                        clip_val: int | float | None = None,
                        gradient_clip_algorithm: GradClipAlgorithmType | None = None) -> None:
        # Lightning calls this right after the on_before_optimizer_step hooks, which have seen the
        # model's bf16 gradients; from here on the step's gradients are the masters' fp32 ones, which
        # is what clipping (on the optimizer's params) and the step act on.
        self._hand_gradients_to_masters(optimizer)
        super()._clip_gradients(model, optimizer, clip_val, gradient_clip_algorithm)

    def _hand_gradients_to_masters(self, optimizer: Optimizer) -> None:
        for param, master in self._masters.get(id(optimizer), ()):
            if param.grad is not None:
                master.grad = param.grad.to(torch.float32)
                # Free the bf16 gradient now: Lightning's zero_grad only reaches the optimizer's params.
                param.grad = None

    def optimizer_step(self, optimizer: Optimizer, model: pl.LightningModule,  # type: ignore[override]
                       closure: Callable[[], Any], **kwargs: Any) -> Any:
        step_output = super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        self.copy_masters_to_weights(optimizer)
        return step_output
