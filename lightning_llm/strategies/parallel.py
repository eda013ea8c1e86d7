"""ParallelStrategy: one device mesh, each parallelism a function applied to the model in turn.

The processes form a mesh with named dimensions, outermost first

    data_parallel x context_parallel x tensor_parallel          (sizes multiply to the world size)

so that the ranks of one tensor-parallel group are neighbours (on GPUs: one node, where the links are
fastest; TP communicates in every layer, data parallelism once per step). The model is built on the
meta device and, one sharding unit (decoder layer) at a time, materialised, split by tensor and
sequence parallelism over `tensor_parallel` (strategies/tensor.py) and sharded by ZeRO over
`data_parallel` (strategies/zero.py, whose code this strategy runs with these two hooks): torchtitan's
order, TP before FSDP. Ranks of one tensor-parallel group see the same batch: the distributed sampler
and the module's data-parallel arithmetic are given the data-parallel coordinate only.

Context parallelism (strategies/context.py) splits every sequence over its dimension; ZeRO then shards
and averages over data x context parallelism. Pipeline and expert parallelism are dimensions of the same
mesh still to come (issue 15 and the issues that follow it); asking for them is refused.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import _sync_ddp_if_available
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor.parallel import ParallelStyle, loss_parallel
from torch.optim import Optimizer

from lightning_llm.protocols import VocabParallelLoss
from lightning_llm.strategies.context import check_block_size, sequence_split, shard_batch, use_ring_attention
from lightning_llm.strategies.tensor import ISSUE, apply_styles, check_divisible, gather_logits_unless, plan_styles
from lightning_llm.strategies.zero import STAGES, ZeROStrategy, _is_hf_model

MESH_DIMS = ("data_parallel", "context_parallel", "tensor_parallel")


class ParallelStrategy(ZeROStrategy):
    """Data parallelism with ZeRO, tensor parallelism and sequence parallelism on one device mesh.

    Args:
        data_parallel: the data-parallel degree; "auto": the world size divided by the other degrees.
        tensor_parallel: the tensor-parallel degree (Megatron's column/row split of attention and MLP,
            read from the model's Hugging Face plan; LM head and cross-entropy split over the vocabulary).
        context_parallel: split every sequence over this many ranks (ring attention, load-balanced causal
            chunks; sequence lengths must be multiples of 2 x context_parallel, batches unpadded with one
            document per row).
        pipeline_parallel, expert_parallel: 1 (the other degrees are not built yet).
        zero_stage: ZeRO over the data-parallel dimension: 2 shards gradients and optimizer state,
            3 also the parameters; 1 (optimizer state only) needs tensor_parallel=1.
        sequence_parallel: with tensor_parallel > 1, shard norms and the residual stream along the sequence
            between the tensor-parallel regions.
        The rest as `ZeROStrategy` (cpu_offload, wrap, activation_checkpointing, empty_init, ...).
    """

    def __init__(
        self,
        data_parallel: int | Literal["auto"] = "auto",
        tensor_parallel: int = 1,
        pipeline_parallel: int = 1,
        context_parallel: int = 1,
        expert_parallel: int = 1,
        zero_stage: int = 3,
        sequence_parallel: bool = True,
        *,
        cpu_offload: bool = False,
        wrap: Sequence[str] | None = None,
        activation_checkpointing: bool = False,
        empty_init: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        degrees = dict(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                       context_parallel=context_parallel, expert_parallel=expert_parallel)
        if data_parallel != "auto":
            degrees["data_parallel"] = data_parallel
        bad = {k: v for k, v in degrees.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
        if bad:
            raise ValueError(f"parallel degrees must be integers >= 1 (data_parallel may be 'auto'), got {bad}")
        later = {k: v for k, v in degrees.items() if k in ("pipeline_parallel", "expert_parallel") and v > 1}
        if later:
            raise NotImplementedError(f"ParallelStrategy({', '.join(f'{k}={v}' for k, v in later.items())}): not built "
                                      f"yet, see {ISSUE}; use PipelineStrategy for pipeline parallelism alone")
        if zero_stage not in STAGES:
            raise ValueError(f"zero_stage must be one of {STAGES}, got {zero_stage!r}")
        if zero_stage == 1 and tensor_parallel > 1:
            raise NotImplementedError(f"zero_stage=1 with tensor_parallel={tensor_parallel}: stage 1 replicates the "
                                      "parameters through DistributedDataParallel, which does not take tensor-parallel "
                                      "(DTensor) parameters; use zero_stage=2 (the same memory for the optimizer state "
                                      "and gradients, less for gradients)")
        super().__init__(zero_stage, cpu_offload=cpu_offload, wrap=wrap, activation_checkpointing=activation_checkpointing,
                         empty_init=empty_init, process_group_backend=process_group_backend, timeout=timeout)
        self.data_parallel = data_parallel
        self.tensor_parallel = tensor_parallel
        self.context_parallel = context_parallel
        self.sequence_parallel = sequence_parallel
        self._styles: dict[nn.Module, ParallelStyle] = {}
        self._lm_head: nn.Module | None = None
        self._vocab_parallel_active = False

    # -- the mesh --------------------------------------------------------------------------------

    def setup_environment(self) -> None:
        self._setup_distributed()
        inner = self.context_parallel * self.tensor_parallel
        data = self.world_size // inner if self.data_parallel == "auto" else self.data_parallel
        if data * inner != self.world_size:
            raise ValueError(f"data_parallel={self.data_parallel} x context_parallel={self.context_parallel} x "
                             f"tensor_parallel={self.tensor_parallel} must equal the world size {self.world_size} (nodes "
                             "x devices); with data_parallel='auto' the world size must be a multiple of the other degrees")
        self._device_mesh = init_device_mesh(self.root_device.type, (data, self.context_parallel, self.tensor_parallel),
                                             mesh_dim_names=MESH_DIMS)
        self.lightning_module._device_mesh = self._device_mesh

    def _data_mesh(self) -> DeviceMesh:
        if self.context_parallel > 1:  # the ranks of a sequence share its loss and gradients like data-parallel ones
            return self.device_mesh["data_parallel", "context_parallel"]._flatten("data_context_parallel")
        return self.device_mesh["data_parallel"]

    @property
    def gradient_replicas(self) -> int:
        """The ranks that average their gradients, each with an equal share of the tokens (see protocols.py):
        data x context parallelism; a context-parallel rank's loss is its share of its sequences' token sum."""
        return self._data_mesh().size()

    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any = "mean") -> Any:
        """Reduce over the data-parallel ranks (by default; with context parallelism, data x context): the ranks
        of a tensor-parallel group hold the same batch and the same loss, so a sum over all ranks would count
        each batch `tensor_parallel` times."""
        if isinstance(tensor, torch.Tensor):
            return _sync_ddp_if_available(tensor, group if group is not None else self._data_mesh().get_group(),
                                          reduce_op=reduce_op)
        return tensor

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        """Agree over every rank, not only the data-parallel group that `reduce` defaults to (Lightning's own
        version sums through `reduce` and compares with the world size: under TP it would never agree)."""
        votes = _sync_ddp_if_available(torch.tensor(int(decision), device=self.root_device), None, reduce_op="sum")
        return bool(votes == self.world_size) if all else bool(votes)

    # -- the model -------------------------------------------------------------------------------

    def setup(self, trainer: Trainer) -> None:
        if self.context_parallel > 1:
            check_block_size(getattr(trainer, "datamodule", None), self.context_parallel)
            use_ring_attention([m for m in self.lightning_module.modules() if _is_hf_model(m)])
        if self.tensor_parallel > 1:
            self._styles = self._tensor_parallel_styles(self.lightning_module)
        super().setup(trainer)

    def _tensor_parallel_styles(self, module: nn.Module) -> dict[nn.Module, ParallelStyle]:
        causal_lms = [(name, m) for name, m in module.named_modules() if _is_hf_model(m) and hasattr(m, "lm_head")]
        if len(causal_lms) != 1:
            raise ValueError(f"tensor_parallel={self.tensor_parallel} needs exactly one Hugging Face causal LM in the "
                             f"LightningModule (built in configure_model), found {[n for n, _ in causal_lms]}")
        name, causal_lm = causal_lms[0]
        check_divisible(causal_lm.config, self.tensor_parallel)
        styles = plan_styles(causal_lm, self.sequence_parallel, prefix=f"{name}." if name else "")
        self._lm_head = causal_lm.lm_head
        if not _takes_vocab_parallel_logits(module):
            rank_zero_info(f"{type(module).__name__} is not a VocabParallelLoss: the LM head's logits are gathered "
                           "whole on every tensor-parallel rank (see lightning_llm.protocols)")
        return styles

    def _parallelize(self, members: list[nn.Module]) -> None:
        apply_styles(members, self._styles, self.device_mesh["tensor_parallel"])
        if any(m is self._lm_head for m in members):  # after its style's own output hook, which makes the logits a DTensor
            self._lm_head.register_forward_hook(gather_logits_unless(lambda: self._vocab_parallel_active))

    # -- steps: the module's loss runs vocabulary-parallel --------------------------------------

    @contextmanager
    def _vocab_parallel(self) -> Generator[None, None, None]:
        if not self._styles or not _takes_vocab_parallel_logits(self.lightning_module):
            yield
            return
        self._vocab_parallel_active = True
        try:
            with loss_parallel():
                yield
        finally:
            self._vocab_parallel_active = False

    # -- steps: each rank holds its share of every sequence, attention runs as a ring ------------

    @contextmanager
    def _ring_attention(self) -> Generator[None, None, None]:
        """Ring attention over the context-parallel group: in the steps, and in backward, where activation
        checkpointing runs the forward again."""
        if self.context_parallel == 1:
            yield
            return
        with sequence_split(self.device_mesh["context_parallel"].get_group()):
            yield

    def _sequence_shares(self, args: tuple) -> tuple:
        """The step's arguments with its batch (the first) cut to this rank's share of every sequence."""
        if self.context_parallel == 1:
            return args
        return (shard_batch(args[0], self.device_mesh["context_parallel"].get_group()), *args[1:])

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._vocab_parallel(), self._ring_attention():
            return super().training_step(*self._sequence_shares(args), **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._vocab_parallel(), self._ring_attention():
            return super().validation_step(*self._sequence_shares(args), **kwargs)

    def backward(self, closure_loss: torch.Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        with self._vocab_parallel(), self._ring_attention():  # loss_parallel's backward must run inside it too
            return super().backward(closure_loss, optimizer, *args, **kwargs)

    def teardown(self) -> None:
        self._styles, self._lm_head = {}, None
        super().teardown()


def _takes_vocab_parallel_logits(module: nn.Module) -> bool:
    return isinstance(module, VocabParallelLoss) and module.vocab_parallel_loss is True
