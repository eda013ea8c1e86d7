"""Token dispatch of a mixture-of-experts layer: capacity, all-to-all to the experts' ranks, combine.

A transformers MoE block routes each token to its top-k experts and calls its experts module with
`(hidden_states [T, d], top_k_index [T, k], top_k_weights [T, k])`; the experts' own forward (the
model's `experts_implementation`: one grouped matmul where torch has one, else a loop) computes every
(token, expert) pair on the experts it holds. `ExpertDispatch` takes that call over and, around the
experts' own forward,

- drops the pairs past an expert's capacity, `ceil(capacity_factor x T x k / experts)` pairs of this
  rank's T tokens (Switch Transformer; earlier tokens first, as GShard): a dropped pair contributes
  nothing and the token keeps its residual. Dropless (every pair computed) without a capacity factor;
- with expert parallelism, sends each pair to the rank that holds its expert and the results back:
  an all-to-all of the per-expert counts, then an all-to-all of variable sizes each way
  (`all_to_all_single_autograd`, whose backward is the reverse exchange);
- combines the results weighted by the router, per token in top-k order (the sum the model's own
  forward makes, so a dropless run computes what the model computes).

transformers 5 has an all-to-all dispatch of its own (`transformers.distributed.expert_parallel.
AllToAllEP`); it is not used because it counts pairs in a table indexed by expert id, so it cannot
leave out dropped pairs, and it takes its sharding from transformers' loading path rather than from a
strategy's mesh. It is written here once and serves both the single-process capacity factor and the
strategy (`lightning_llm.strategies.expert`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh


class ExpertDispatch:
    """Replaces the `forward` of one experts module (fused 3-D expert weights, transformers' layout).

    Attributes measured at each forward (for logs and benchmarks): `dropped_fraction` (pairs dropped
    by the capacity / all pairs), `sent_rows` (pairs sent to another rank), `tokens_per_expert`
    (pairs of this rank's tokens routed to each global expert, after drops).
    """

    def __init__(self, experts: nn.Module, capacity_factor: float | None = None) -> None:
        check_capacity_factor(capacity_factor)
        self.experts = experts
        self.expert_forward = experts.forward  # the model's own implementation, run on the local experts
        self.num_experts: int = experts.num_experts
        self.capacity_factor = capacity_factor
        self.mesh: DeviceMesh | None = None
        self.adapters: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {}
        self.dropped_fraction = torch.zeros(())
        self.sent_rows = 0
        self.tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.long)
        experts.forward = self

    def shard(self, mesh: DeviceMesh, caller: nn.Module | None = None,
              adapters: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] | None = None) -> None:
        """Run the experts of this rank (a contiguous 1/mesh.size() of them; its weights already cut so)
        and exchange the pairs over `mesh`.

        `adapters`: for weights that carry LoRA updates (peft's wrappers around the experts), a function of the
        local weight and the first local expert's global index that adds the local experts' updates
        (`lightning_llm.strategies.expert.LocalExpertAdapter`). The dispatch then takes over the call of
        `caller`, the outermost wrapper, which the MoE block calls: peft's own forward would add every expert's
        update to the whole weight, which this rank does not hold."""
        ranks = mesh.size()
        if self.num_experts % ranks:
            raise ValueError(f"expert_parallel={ranks} does not divide the {self.num_experts} experts of "
                             f"{type(self.experts).__name__}: each rank holds the same number of whole experts")
        self.mesh = mesh
        self.experts.num_experts = self.num_experts // ranks
        self.adapters = dict(adapters or {})
        if caller is not None and caller is not self.experts:
            del self.experts.forward  # back to the class's: the dispatch is called in the wrappers' place
            caller.forward = self

    def capacity(self, tokens: int, top_k: int) -> int | None:
        """Most pairs one expert computes of this rank's `tokens` tokens; None when dropless."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * tokens * top_k / self.num_experts)

    def __call__(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        tokens, top_k = top_k_index.shape
        pairs = tokens * top_k
        expert_ids = top_k_index.reshape(-1)
        order = torch.argsort(expert_ids, stable=True)  # pairs grouped by expert, each group in token order
        counts = torch.bincount(expert_ids, minlength=self.num_experts)
        capacity = self.capacity(tokens, top_k)
        if capacity is not None:
            first = torch.cumsum(counts, 0) - counts  # where each expert's group starts in `order`
            rank_in_expert = torch.arange(pairs, device=order.device) - first[expert_ids[order]]
            order = order[rank_in_expert < capacity]
            counts = counts.clamp(max=capacity)
        self.dropped_fraction = torch.tensor(1 - order.numel() / max(pairs, 1))
        self.tokens_per_expert = counts.detach().cpu()
        rows = hidden_states[order // top_k]
        if self.mesh is None:
            out = self._run_experts(rows, expert_ids[order])
        else:
            out = self._exchange_and_run(rows, counts)
        weighted = out * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
        per_pair = weighted.new_zeros(pairs, weighted.shape[-1])
        per_pair[order] = weighted  # dropped pairs stay zero
        return per_pair.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)

    def _exchange_and_run(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        from torch.distributed import all_to_all_single
        from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

        group, ranks = self.mesh.get_group(), self.mesh.size()
        local = self.num_experts // ranks
        send_counts = counts.view(ranks, local)  # experts are contiguous per rank: grouped by expert is by rank
        recv_counts = torch.empty_like(send_counts)
        all_to_all_single(recv_counts, send_counts.contiguous(), group=group)
        send_sizes, recv_sizes = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()  # one host sync
        self.sent_rows = sum(send_sizes) - send_sizes[self.mesh.get_local_rank()]
        received = wait_tensor(all_to_all_single_autograd(rows, recv_sizes, send_sizes, group))
        # Rows arrive by sender, each sender's by local expert: the experts' forward groups them itself.
        local_ids = torch.arange(local, device=rows.device).repeat(ranks).repeat_interleave(recv_counts.reshape(-1))
        out = self._run_experts(received, local_ids)
        return wait_tensor(all_to_all_single_autograd(out, send_sizes, recv_sizes, group))

    def _run_experts(self, rows: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """The experts' own forward on `rows`, each row for one (local) expert with weight 1."""
        with self._local_weights():
            if rows.shape[0] == 0:
                # Keep an empty batch connected to the weights and to the rows (a zero row summed from them), so
                # every rank's experts get a (zero) gradient and the reverse all-to-all runs in backward on every
                # rank: the collectives of backward, clipping and the optimizer step must match across ranks.
                dummy = rows.sum(dim=0, keepdim=True)
                out = self.expert_forward(dummy, expert_ids.new_zeros(1, 1), rows.new_ones(1, 1))
                return out[:0]
            return self.expert_forward(rows, expert_ids.unsqueeze(-1), rows.new_ones(rows.shape[0], 1))

    @contextmanager
    def _local_weights(self) -> Iterator[None]:
        """Expert-parallel weights are `DTensor` shards: the experts' forward runs on the local tensors.

        An expert's gradient is summed over the tokens of every rank (they came to it); the data-parallel
        gradients of the rest of the model are averaged over the ranks. Scaling the experts' by 1 / ranks
        makes both the gradient of the mean of the ranks' losses, as one process on the global batch. LoRA
        updates of the local experts (`adapters`) are added after the scale: their factors are replicated
        parameters, whose gradients ZeRO averages over the ranks like the rest of the model's."""
        if self.mesh is None:
            yield
            return
        from torch.distributed.tensor import DTensor

        params = {name: p for name, p in self.experts.named_parameters(recurse=False) if isinstance(p, DTensor)}
        scale = 1.0 / self.mesh.size()
        first = self.mesh.get_local_rank() * self.experts.num_experts  # global index of this rank's first expert
        for name, p in params.items():
            local = _ScaleGrad.apply(p.to_local(), scale)
            if name in self.adapters:  # after the scale: ZeRO averages the adapters' gradients itself
                local = self.adapters[name](local, first)
            self.experts._parameters[name] = local
        try:
            yield
        finally:
            self.experts._parameters.update(params)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def check_capacity_factor(capacity_factor: float | None) -> None:
    if capacity_factor is not None and (isinstance(capacity_factor, bool) or not capacity_factor > 0):
        raise ValueError(f"capacity_factor must be a number > 0 (1.0: an expert takes its even share of the "
                         f"pairs) or None for dropless routing, got {capacity_factor!r}")


def is_experts(module: nn.Module) -> bool:
    """A transformers experts module: all experts' weights in fused 3-D tensors, called with top-k routes."""
    return isinstance(getattr(module, "num_experts", None), int) and all(
        isinstance(getattr(module, name, None), nn.Parameter) and getattr(module, name).ndim == 3
        for name in ("gate_up_proj", "down_proj"))


def dispatch_of(experts: nn.Module) -> ExpertDispatch:
    """The dispatch installed on `experts`, installing a dropless one if there is none."""
    forward = experts.__dict__.get("forward")
    return forward if isinstance(forward, ExpertDispatch) else ExpertDispatch(experts)


def use_capacity(model: nn.Module, capacity_factor: float | None) -> list[ExpertDispatch]:
    """Give every experts module of `model` a dispatch with `capacity_factor`; returns them in layer order."""
    check_capacity_factor(capacity_factor)
    dispatches = [dispatch_of(m) for m in model.modules() if is_experts(m)]
    for dispatch in dispatches:
        dispatch.capacity_factor = capacity_factor
    return dispatches


def dispatches(model: nn.Module) -> list[ExpertDispatch]:
    """The dispatches installed in `model`, in layer order."""
    return [m.__dict__["forward"] for m in model.modules() if isinstance(m.__dict__.get("forward"), ExpertDispatch)]
