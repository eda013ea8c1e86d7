"""Dynamic loss scaling for fp16: a `torch.amp.GradScaler` whose overflow verdict every rank shares,
and a learning-rate scheduler wrapper that holds the schedule still on a skipped step.

fp16 has 5 exponent bits: gradients below ~6e-8 flush to zero. The loss is multiplied by a scale
before backward and the gradients divided by it before the step; a step whose gradients hold inf or
NaN is skipped and the scale backed off, and after `growth_interval` good steps in a row it grows.
`torch.amp.GradScaler` does all of that; what it does not do is make the verdict agree across ranks
when each rank sees only its own gradients (a pipeline stage, a ZeRO/FSDP shard, or a DDP rank whose
overflow happened before the all-reduce), so one rank could step while another skips.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist


def any_rank(flags: torch.Tensor) -> torch.Tensor:
    """`flags` (0/1 floats) made the same on every rank of the default process group: 1 where any rank has 1.

    Every rank must call it at the same point (it is a collective when a process group is running)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


class DynamicLossScaler(torch.amp.GradScaler):
    """`torch.amp.GradScaler` whose found-inf flag is all-reduced (max) over the default process group.

    `unscale_` (called explicitly, or by `step`) runs the usual per-device inf/NaN check, then one
    all-reduce makes the flag the same on every rank before any rank steps, so `step` skips and
    `update` backs off everywhere or nowhere. Gradients that are DTensors (FSDP2) are handled by
    torch: its found-inf op already reduces over the DTensor's mesh; the all-reduce here covers the
    ranks outside that mesh (pipeline stages, replicas).
    """

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        super().unscale_(optimizer)
        if not self.is_enabled():
            return
        # GradScaler keeps one found-inf tensor per device in this private per-optimizer state; `step`
        # and `update` read the same tensors, so overwriting them with the agreed verdict is enough.
        found_inf_per_device = self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        flags = list(found_inf_per_device.values())
        verdict = torch.zeros((), dtype=torch.float32, device=self._scale.device)
        for flag in flags:
            verdict = torch.maximum(verdict, flag.to(verdict.device))
        verdict = any_rank(verdict)
        for flag in flags:
            flag.copy_(verdict)
        if not flags:
            # A rank without gradients still joined the all-reduce; record its verdict so that
            # `step` and `update` find one.
            found_inf_per_device[verdict.device] = verdict

    def found_inf(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether the last `unscale_` of `optimizer` found inf/NaN on any rank (valid until `update`)."""
        flags = self._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values()
        return any(bool(flag.item()) for flag in flags)


class HoldOnSkippedStep:
    """Wraps an LR scheduler so that `step()` does nothing right after a skipped optimizer step.

    Lightning steps "step"-interval schedulers after every optimizer step, skipped or not; a step
    that updated nothing must not advance warmup or decay. Everything else (state_dict, get_last_lr,
    optimizer, ...) is the wrapped scheduler's. With `frequency > 1` the scheduler is held when the
    optimizer step just before its turn was skipped.
    """

    def __init__(self, scheduler: Any, step_was_skipped: Callable[[], bool]) -> None:
        self.scheduler = scheduler
        self._step_was_skipped = step_was_skipped

    def step(self, *args: Any, **kwargs: Any) -> None:
        if not self._step_was_skipped():
            self.scheduler.step(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)

    def __getattr__(self, name: str) -> Any:
        # Only called for names not found on the wrapper; `scheduler` is looked up through __dict__
        # so that a half-built instance (e.g. while unpickling) raises AttributeError, not recursion.
        if name == "scheduler":
            raise AttributeError(name)
        return getattr(self.scheduler, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.scheduler!r})"
