"""ParallelStrategy: one device mesh, each parallelism a function applied to the model in turn.

The processes form a mesh with named dimensions, outermost first (torchtitan's order)

    pipeline_parallel x data_parallel x context_parallel x tensor_parallel     (sizes multiply to the world size)

so that the ranks of one tensor-parallel group are neighbours (on GPUs: one node, where the links are
fastest; TP communicates in every layer, data parallelism once per step, the pipeline sends one
activation per micro-batch point to point, the least, so its stages may sit on different nodes).
The model is built on the meta device; with `pipeline_parallel` > 1 it is first cut into stages and
pruned to this rank's (strategies/pipeline.py); then, one sharding unit (decoder layer) at a time, it
is materialised, split by tensor and sequence parallelism over `tensor_parallel` (strategies/tensor.py)
and sharded by ZeRO over `data_parallel` (strategies/zero.py, whose code this strategy runs with these
hooks): torchtitan's order, pipeline split, then TP, then FSDP, each stage's module its own root unit,
so that torch's schedules run ZeRO's gathers and reduce-scatters (one per step, after the last
micro-batch's backward). Ranks of one tensor-parallel group and of one pipeline see the same batch:
the distributed sampler and the module's data-parallel arithmetic are given the data-parallel
coordinate only.

Expert parallelism borrows the data-parallel ranks (expert_parallel = data_parallel: each rank holds
1/N of the experts and its own batch; tokens reach the experts by all-to-all): strategies/expert.py.
Context parallelism (strategies/context.py) splits every sequence over its dimension (ring or all-to-all attention);
ZeRO then shards and averages over data x context. Under a pipeline, ZeRO-1 replicates each stage with
DistributedDataParallel over the data dimension and shards its optimizer state there (under zero bubble, whose
split backward DDP does not see, the pipeline replicates the stages and averages their gradients itself).
Refused, not built yet: a pipeline with context parallelism, expert parallelism with a pipeline, tensor or context parallelism.
LoRA adapters are split beside their base, and QLoRA's 4-bit base stays whole with each rank multiplying by its
slice (strategies/tensor.py).
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
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ParallelStyle, loss_parallel
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from lightning_llm.protocols import EvaluationCalls, VocabParallelLoss
from lightning_llm.strategies.pipeline import Pipeline, causal_lm_of, tied_groups
from lightning_llm.strategies.context import (
    check_block_size,
    sequence_split,
    shard_batch,
    use_all_to_all_attention,
    use_ring_attention,
)
from lightning_llm.strategies.expert import PlannedExperts, plan_experts, shard_experts
from lightning_llm.strategies.launch import check_launch_size
from lightning_llm.strategies.tensor import ISSUE, apply_styles, check_divisible, gather_logits_unless, plan_styles
from lightning_llm.strategies.zero import STAGES, ZeROStrategy, _is_hf_model

MESH_DIMS = ("pipeline_parallel", "data_parallel", "context_parallel", "tensor_parallel")
CONTEXT_PARALLEL_MODES = ("ring", "all_to_all")


class ParallelStrategy(ZeROStrategy):
    """Pipeline parallelism, data parallelism with ZeRO, tensor and sequence parallelism on one device mesh.

    Layouts that train as one process does (tests/test_parallel.py, tests/test_parallel_pipeline.py): tp2 (with
    and without SP), dp2 x tp2, pp2, pp2 x dp2 (ZeRO-1 also under the interleaved 1F1B and zero-bubble
    schedules), pp2 x tp2; tp2 with compiled blocks (tests/test_compile.py); cp2 in both context-parallel modes,
    dp2 x cp2 and cp2 x tp2 (tests/test_context_parallel.py); LoRA adapters at tp2 with and without SP and at dp2 x tp2
    (tests/test_parallel_lora.py, at tp2 under bf16-mixed too; the whole model is built on every rank first:
    empty_init=False); LoRA at dp2 x ep2, with
    adapters on every expert too (tests/test_expert_parallel_lora.py). Under a pipeline the module must be a
    `lightning_llm.protocols.PipelinedTraining` (its loss on the last stage, its metrics logged on every rank).
    Under the precision plugins (`MixedPrecision` fp16 with loss scaling or bf16, `MasterWeightsPrecision`)
    tp2 trains as one process under the same plugin (dp2 x tp2 too, tested under fp16), and an fp16 overflow
    in any rank's shard skips the step on every rank (tests/test_parallel_precision.py). The benchmark callbacks split their
    requests over the data-parallel ranks (`data_parallel_group`, data x context), each tensor-parallel group and
    each pipeline running them together (`evaluating`), and log the one-process metrics under tp2, dp2 x tp2, pp2,
    pp2 x dp2, pp2 x tp2, cp2 (both modes) and dp2 x ep2 (tests/test_eval_sharded.py, tests/test_eval_layouts.py).

    Args:
        data_parallel: the data-parallel degree; "auto": the world size divided by the other degrees.
        tensor_parallel: the tensor-parallel degree (Megatron's column/row split of attention and MLP,
            read from the model's Hugging Face plan; LM head and cross-entropy split over the vocabulary).
        pipeline_parallel: pipeline stages (ranks) p: the decoder layers are cut into p contiguous stages
            (embedding on the first, final norm and LM head on the last) and each batch streams through
            them as micro-batches (see `PipelineStrategy` for what the module must provide).
        expert_parallel: the experts of each mixture-of-experts layer split over this many ranks, which are
            the data-parallel ranks (so it must equal data_parallel; see strategies/expert.py).
        context_parallel: split every sequence over this many ranks (load-balanced causal chunks; sequence
            lengths must be multiples of 2 x context_parallel, batches unpadded; packed rows, position ids
            restarting at each document, keep their documents apart in both modes).
        context_parallel_mode: how attention sees the whole sequence: "ring" (the default; K/V blocks pass
            around the ring, any head count, packed rows) or "all_to_all" (DeepSpeed Ulysses: all-to-alls give
            each rank the whole sequence for 1/context_parallel of the heads; the degree must divide the heads
            of a tensor-parallel rank, and divide its K/V heads or be a multiple of them; packed rows too).
            Given with context_parallel=1 it is refused.
        zero_stage: ZeRO over the data-parallel dimension: 2 shards gradients and optimizer state,
            3 also the parameters; 1 (optimizer state only) needs tensor_parallel=1; 3 is refused with the
            zero-bubble schedule.
        sequence_parallel: with tensor_parallel > 1, shard norms and the residual stream along the sequence
            between the tensor-parallel regions.
        microbatches, schedule, stages_per_rank, split_points: the pipeline's, as `PipelineStrategy` takes them
            (defaults 4, "1f1b", 1 or 2, balanced); given with pipeline_parallel=1 they are refused.
        The rest as `ZeROStrategy` (cpu_offload, wrap, activation_checkpointing, empty_init, ...).
    """

    # The name of the pipeline's degree in error messages: the argument the user typed.
    _pipeline_degree = "pipeline_parallel"

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
        microbatches: int | None = None,
        schedule: str | None = None,
        stages_per_rank: int | None = None,
        split_points: list[int] | None = None,
        context_parallel_mode: Literal["ring", "all_to_all"] | None = None,
        cpu_offload: bool = False,
        wrap: Sequence[str] | None = None,
        activation_checkpointing: bool = False,
        empty_init: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        pp = self._pipeline_degree
        degrees = {"tensor_parallel": tensor_parallel, pp: pipeline_parallel, "context_parallel": context_parallel,
                   "expert_parallel": expert_parallel}
        if data_parallel != "auto":
            degrees["data_parallel"] = data_parallel
        bad = {k: v for k, v in degrees.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
        if bad:
            raise ValueError(f"parallel degrees must be integers >= 1 (data_parallel may be 'auto'), got {bad}")
        if zero_stage not in STAGES:
            raise ValueError(f"zero_stage must be one of {STAGES}, got {zero_stage!r}")
        if zero_stage == 1 and tensor_parallel > 1:
            raise NotImplementedError(f"zero_stage=1 with tensor_parallel={tensor_parallel}: stage 1 replicates the "
                                      "parameters through DistributedDataParallel, which does not take tensor-parallel "
                                      "(DTensor) parameters; use zero_stage=2 (the same memory for the optimizer state "
                                      "and gradients, less for gradients)")
        pipeline_options = dict(microbatches=microbatches, schedule=schedule, stages_per_rank=stages_per_rank,
                                split_points=split_points)
        given = {k: v for k, v in pipeline_options.items() if v is not None}
        if given and pipeline_parallel == 1:
            raise ValueError(f"{given} configure a pipeline, but {pp}=1: a pipeline needs {pp} >= 2 (without one, "
                             "leave them out)")
        # The pipeline's own arguments are checked here too (before any process starts); defaults as PipelineStrategy's.
        self._pipeline = Pipeline(pipeline_parallel, 4 if microbatches is None else microbatches, schedule or "1f1b",
                                  stages_per_rank, split_points, degree=pp) if pipeline_parallel > 1 else None
        if zero_stage == 3 and self._pipeline is not None and self._pipeline.splits_backward:
            raise NotImplementedError(f"zero_stage=3 with schedule={schedule!r}: not built yet ({ISSUE}); ZeRO-3's "
                                      "parameter gathers and the schedule's split backward train wrong together "
                                      "(losses 4-5% off one process's within 6 steps at pp2, with or without data "
                                      "parallelism). Use zero_stage=1 or 2 with this schedule, or "
                                      "schedule='interleaved-1f1b' with zero_stage=3")
        if expert_parallel > 1 and (tensor_parallel > 1 or zero_stage == 1):
            raise NotImplementedError(f"expert_parallel={expert_parallel} with tensor_parallel={tensor_parallel}, "
                                      f"zero_stage={zero_stage}: expert parallelism runs with tensor_parallel=1 and "
                                      "zero_stage 2 or 3 (stage 1's DistributedDataParallel would average the "
                                      "different experts of different ranks)")
        if context_parallel_mode is not None and context_parallel_mode not in CONTEXT_PARALLEL_MODES:
            raise ValueError(f"context_parallel_mode must be one of {CONTEXT_PARALLEL_MODES}, got "
                             f"{context_parallel_mode!r}")
        if context_parallel_mode is not None and context_parallel == 1:
            raise ValueError(f"context_parallel_mode={context_parallel_mode!r} selects how a sequence split over "
                             "context-parallel ranks is attended, but context_parallel=1: set context_parallel > 1 "
                             "or leave it out")
        if context_parallel > 1 and (pipeline_parallel > 1 or expert_parallel > 1):
            raise NotImplementedError(f"context_parallel={context_parallel} with pipeline_parallel={pipeline_parallel}, "
                                      f"expert_parallel={expert_parallel}: not built yet ({ISSUE}); context parallelism "
                                      "composes with data and tensor parallelism")
        if expert_parallel > 1 and pipeline_parallel > 1:
            raise NotImplementedError(f"expert_parallel={expert_parallel} with pipeline_parallel={pipeline_parallel}: "
                                      "not built yet; expert parallelism runs with pipeline_parallel=1")
        super().__init__(zero_stage, cpu_offload=cpu_offload, wrap=wrap, activation_checkpointing=activation_checkpointing,
                         empty_init=empty_init, process_group_backend=process_group_backend, timeout=timeout)
        self.data_parallel = data_parallel
        self.tensor_parallel = tensor_parallel
        self.pipeline_parallel = pipeline_parallel
        self.context_parallel = context_parallel
        self.context_parallel_mode = context_parallel_mode or "ring"
        self.expert_parallel = expert_parallel
        self.sequence_parallel = sequence_parallel
        self._styles: dict[nn.Module, ParallelStyle] = {}
        self._experts: dict[nn.Module, PlannedExperts] = {}
        self._lm_head: nn.Module | None = None
        self._data_context_mesh: DeviceMesh | None = None
        self._vocab_parallel_active = False

    # -- the mesh --------------------------------------------------------------------------------

    def setup_environment(self) -> None:
        check_launch_size(self)  # before the rendezvous, which a wrong size would wait in
        self._setup_distributed()
        others = self.pipeline_parallel * self.context_parallel * self.tensor_parallel
        data = self.world_size // others if self.data_parallel == "auto" else self.data_parallel
        if data * others != self.world_size:
            raise ValueError(f"{self._pipeline_degree}={self.pipeline_parallel} x data_parallel={self.data_parallel!r} x "
                             f"context_parallel={self.context_parallel} x tensor_parallel={self.tensor_parallel} must equal the world size {self.world_size} "
                             "(nodes x devices); with data_parallel='auto' the world size must be a multiple of "
                             f"the other degrees' product {others}")
        if self.expert_parallel > 1 and self.expert_parallel != data:
            raise ValueError(f"expert_parallel={self.expert_parallel} must equal the data-parallel degree {data}: the "
                             "expert-parallel ranks are the data-parallel ones (each holds its own batch and "
                             f"1/{data} of the experts)")
        mesh = init_device_mesh(self.root_device.type, (self.pipeline_parallel, data, self.context_parallel, self.tensor_parallel),
                                mesh_dim_names=MESH_DIMS)
        self._device_mesh = mesh
        self.lightning_module._device_mesh = mesh
        self._data_context_mesh = data_context_mesh(mesh) if self.context_parallel > 1 else None
        if self._pipeline is not None:
            # One pipeline per (data, tensor) coordinate: its ranks, in stage order, are a column of the mesh.
            pipelines = mesh.mesh.permute(1, 2, 3, 0).reshape(-1, self.pipeline_parallel)
            # Under sequence parallelism the residual stream between stages is sharded along the sequence.
            residual = (mesh["tensor_parallel"], (Shard(1),)) if self.tensor_parallel > 1 and self.sequence_parallel else None
            self._pipeline.connect(self, mesh["pipeline_parallel"].get_local_rank(), mesh["pipeline_parallel"].get_group(),
                                   self._data_mesh().get_group(), tied_groups(pipelines), residual)

    def _data_mesh(self) -> DeviceMesh:
        if self._data_context_mesh is not None:  # the ranks of a sequence share its loss and gradients like data-parallel ones
            return self._data_context_mesh["data_context_parallel"]
        return self.device_mesh["data_parallel"]

    @property
    def data_parallel_group(self) -> Any:
        """The ranks that hold different batches (data x context parallelism): an evaluation splits its
        requests over them, while the ranks of a tensor-parallel group and of a pipeline take the same ones
        (protocols.py). The context-parallel ranks take different requests too: outside the training and
        validation steps attention sees whole sequences on one rank (ring and all-to-all attention run only
        under `sequence_split`), and the weights are whole or ZeRO-sharded over data x context, gathered
        whole by each forward, so each rank scores its own requests as one process would, and the work is
        split context_parallel times finer than over the data-parallel ranks alone."""
        return self._data_mesh().get_group()

    @contextmanager
    def evaluating(self, model: nn.Module) -> Generator[EvaluationCalls, None, None]:
        """protocols.WholeModelEvaluation: around an evaluation of the module's causal LM (lm-eval). Under a
        pipeline its forward runs through the stages (`Pipeline.redirected`) without a KV cache; the calls are
        kept in lockstep on every layout of more than one rank (ZeRO's gathers, tensor parallelism's and expert
        parallelism's collectives, the pipeline's shape agreement over its data-parallel replicas)."""
        if self._pipeline is None:
            yield EvaluationCalls(lockstep=self.world_size > 1)
            return
        own = causal_lm_of(self.lightning_module)
        if model is not own:
            raise ValueError(f"{self._pipeline_degree}={self.pipeline_parallel}: only the pipelined causal LM "
                             f"({type(own).__name__}, the LightningModule's `model` or `pipeline_model()`) can be "
                             f"evaluated through the pipeline, got a {type(model).__name__}")
        with self._pipeline.redirected():
            yield EvaluationCalls(kv_cache=False, lockstep=True)

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
        if self.tensor_parallel > 1:  # (read from the whole model's plan, before the pipeline prunes it)
            self._styles = self._tensor_parallel_styles(self.lightning_module)
        if self.context_parallel > 1:  # (after the tensor-parallel check: all-to-all shares the heads of a TP rank)
            check_block_size(getattr(trainer, "datamodule", None), self.context_parallel)
            models = [m for m in self.lightning_module.modules() if _is_hf_model(m)]
            if self.context_parallel_mode == "all_to_all":
                use_all_to_all_attention(models, self.context_parallel, self.tensor_parallel)
            else:
                use_ring_attention(models)
        if self._pipeline is not None:  # then the stages: only this rank's are ever materialised
            self._pipeline.split(self.lightning_module)
        if self.expert_parallel > 1:
            self._experts = plan_experts(self._causal_lm(f"expert_parallel={self.expert_parallel}")[1], self.expert_parallel)
        super().setup(trainer)
        if self._pipeline is not None:
            self._pipeline.make_clipping_global()

    def _sharding_roots(self, module: nn.Module) -> list[nn.Module]:
        # Under the pipeline the schedule calls the stages, not the LightningModule: each stage is a root
        # unit, which torch's PipelineStage recognises (it defers ZeRO's reduce-scatter to the last micro-batch).
        return self._pipeline.stage_modules if self._pipeline is not None else super()._sharding_roots(module)

    def _shard(self, module: nn.Module, units: list[nn.Module]) -> None:
        super()._shard(module, units)
        if self._pipeline is not None:
            self._pipeline.retie()
            self._check_stages_hold(module)
            self._pipeline.broadcast_tied()

    def _replicate(self, module: nn.Module) -> nn.Module:
        if self._pipeline is None:
            return super()._replicate(module)
        # ZeRO-1 under the pipeline: the schedule calls the stages, so each stage is replicated over the data
        # dimension by DistributedDataParallel (torch's PipelineStage defers its all-reduce to the last
        # micro-batch's backward), and the optimizer steps shards of it (`OptimizerShards`, as without a pipeline).
        # find_unused_parameters=True only turns off DDP's rebuild of its buckets after the first step, which
        # counts every micro-batch's gradients and fails (every parameter is used: the check finds none unused).
        # Under zero bubble, whose split backward DDP's reducer does not see, the pipeline replicates by hand.
        self._check_stages_hold(module)
        if self._pipeline.splits_backward:
            self._pipeline.replicate_by_hand()
        else:
            group = self._data_mesh().get_group()
            device_ids = None if self.root_device.type == "cpu" else [self.root_device.index]
            self._pipeline.stage_modules = [DistributedDataParallel(stage, device_ids=device_ids, process_group=group,
                                                                    find_unused_parameters=True)
                                            for stage in self._pipeline.stage_modules]
        self._pipeline.broadcast_tied()
        return module

    def _check_stages_hold(self, module: nn.Module) -> None:
        inside = {id(p) for stage in self._pipeline.stage_modules for p in stage.parameters()}
        outside = [name for name, p in module.named_parameters() if id(p) not in inside]
        if outside:
            raise ValueError(f"{self._pipeline_degree}={self.pipeline_parallel}: {type(module).__name__} has parameters "
                             f"outside the causal LM's stages, which no stage would train: {outside}")

    def _causal_lm(self, what: str) -> tuple[str, nn.Module]:
        module = self.lightning_module
        found = [(name, m) for name, m in module.named_modules() if _is_hf_model(m) and hasattr(m, "lm_head")]
        # A wrapper (peft's PeftModel and LoraModel under LoRA) answers for the causal LM inside it: the innermost counts.
        causal_lms = [(name, m) for name, m in found if not any(other.startswith(f"{name}.") for other, _ in found)]
        if len(causal_lms) != 1:
            raise ValueError(f"{what} needs exactly one Hugging Face causal LM in the LightningModule (built in "
                             f"configure_model), found {[n for n, _ in causal_lms]}")
        return causal_lms[0]

    def _tensor_parallel_styles(self, module: nn.Module) -> dict[nn.Module, ParallelStyle]:
        name, causal_lm = self._causal_lm(f"tensor_parallel={self.tensor_parallel}")
        check_divisible(causal_lm.config, self.tensor_parallel)
        styles = plan_styles(causal_lm, self.sequence_parallel, prefix=f"{name}." if name else "",
                             degree=self.tensor_parallel)
        self._lm_head = causal_lm.lm_head
        if not _takes_vocab_parallel_logits(module):
            rank_zero_info(f"{type(module).__name__} is not a VocabParallelLoss: the LM head's logits are gathered "
                           "whole on every tensor-parallel rank (see lightning_llm.protocols)")
        return styles

    def _parallelize(self, members: list[nn.Module]) -> None:
        apply_styles(members, self._styles, self.device_mesh["tensor_parallel"])
        shard_experts(members, self._experts, self._data_mesh())
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

    # Under the pipeline the schedule runs each training step, forward and backward (the module's loss on the
    # last stage): all of it under `loss_parallel`, so that with tensor parallelism the last stage's loss takes
    # the vocabulary slices. The evaluation steps run the module's own with the causal LM's forward redirected
    # through the stages, whose logits the last stage gathers whole (the LM head's hook) to broadcast them.

    def on_train_start(self) -> None:
        if self._pipeline is not None:
            self._pipeline.check_loader(self.lightning_module.trainer.train_dataloader)

    @contextmanager
    def _ring_attention(self) -> Generator[None, None, None]:
        """Ring (or all-to-all) attention over the context-parallel group: in the steps, and in backward, where
        activation checkpointing runs the forward again."""
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
        if self._pipeline is not None:
            with self._vocab_parallel():
                return self._pipeline.training_step(args[0] if args else kwargs["batch"])
        with self._vocab_parallel(), self._ring_attention():
            return super().training_step(*self._sequence_shares(args), **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._pipeline is not None:
            return self._pipeline.evaluation_step("validation_step", self.precision_plugin.val_step_context(), *args, **kwargs)
        with self._vocab_parallel(), self._ring_attention():
            return super().validation_step(*self._sequence_shares(args), **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._pipeline is not None:
            return self._pipeline.evaluation_step("test_step", self.precision_plugin.test_step_context(), *args, **kwargs)
        return super().test_step(*args, **kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._pipeline is not None:
            return self._pipeline.evaluation_step("predict_step", self.precision_plugin.predict_step_context(), *args, **kwargs)
        return super().predict_step(*args, **kwargs)

    def backward(self, closure_loss: torch.Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._pipeline is not None:  # the schedule ran it; ZeRO reduced the gradients over the data dimension
            self.pre_backward(closure_loss)
            closure_loss = self._pipeline.backward(closure_loss)
            self.post_backward(closure_loss)
            return closure_loss
        with self._vocab_parallel(), self._ring_attention():  # loss_parallel's backward must run inside it too
            return super().backward(closure_loss, optimizer, *args, **kwargs)

    def full_model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole `model`'s state dict on global rank 0, None elsewhere (every rank calls this; for an export):
        the shards gathered over the data and tensor ranks and, under a pipeline, the stages joined on rank 0."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self._pipeline is None:
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return state if self.global_rank == 0 else None
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        coordinates = self.device_mesh["data_parallel"].get_local_rank(), self.device_mesh["tensor_parallel"].get_local_rank()
        local = {name: t.detach().cpu() for name, t in state.items()} if coordinates == (0, 0) else None
        return self._pipeline.join_stages(local)

    def teardown(self) -> None:
        self._styles, self._lm_head, self._experts = {}, None, {}
        if self._pipeline is not None:
            self._pipeline.teardown()
        super().teardown()


def data_context_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The same ranks as `mesh` (`MESH_DIMS`) with its data and context dimensions merged into one,
    `data_context_parallel`: the group that ZeRO shards over and averages gradients over under context parallelism.

    Built with the public constructor from the same rank layout (data and context are neighbouring dimensions,
    so merging them reorders no rank): the new mesh's rank map is the first's, which is what lets `fully_shard`
    over its `data_context_parallel` dimension combine with tensor-parallel DTensors on the first mesh's
    `tensor_parallel` dimension. Every rank must call it (it creates process groups), once.
    """
    names = mesh.mesh_dim_names
    merged = mesh.mesh.flatten(names.index("data_parallel"), names.index("context_parallel"))
    return DeviceMesh(mesh.device_type, merged,
                      mesh_dim_names=("pipeline_parallel", "data_context_parallel", "tensor_parallel"))


def _takes_vocab_parallel_logits(module: nn.Module) -> bool:
    return isinstance(module, VocabParallelLoss) and module.vocab_parallel_loss is True


class PipelineStrategy(ParallelStrategy):
    """Pipeline parallelism for Hugging Face causal LMs: `ParallelStrategy`'s one-dimension form.

    `PipelineStrategy(stages=p, ...)` is `ParallelStrategy(pipeline_parallel=p, data_parallel="auto",
    zero_stage=2, empty_init=False, ...)`: the same code and the same checkpoints. With more ranks than
    stages (world = data parallel x p) each stage is sharded by ZeRO over the ranks that hold it in the
    other pipelines, which also averages its gradients.

    The LightningModule holds the causal LM as `self.model` (created in `__init__` or
    `configure_model`), or returns it from a method `pipeline_model()`; it must be a submodule of the
    LightningModule, and the module a `lightning_llm.protocols.PipelinedTraining` (its `loss_sum` is the
    loss the last stage computes, its `log_training_step` logs the step). Batches are dicts with
    `input_ids` [B, T], `targets` [B, T] (next tokens, already shifted, -100 ignored) and optional
    `position_ids` / `attention_mask` [B, T]. The training loss is the module's summed loss over the
    batch's target tokens divided by their number, exactly as one process computes it over the whole batch.

    Args:
        stages: number of pipeline ranks p; the world size must be a multiple (world = dp x p).
        microbatches: micro-batches m per batch; the per-rank batch size must be divisible by it, and the
            schedule must accept it (1F1B: m >= stages; interleaved: m splits into equal rounds of ~stages).
        schedule: "gpipe", "1f1b", "interleaved-1f1b" or "interleaved-zero-bubble".
        stages_per_rank: model chunks per rank for the interleaved schedules (default 2; 1 otherwise).
        split_points: index of the first decoder layer of stages 1..S-1 (S = stages x stages_per_rank);
            default: contiguous stages balanced by parameter count (the LM head counts for the last).
        zero_stage: ZeRO over the pipelines (data parallelism): 2 shards each stage's gradients and
            optimizer state (the communication of plain data parallelism: a reduce-scatter and an
            all-gather per step), 3 also its parameters (gathered again for every micro-batch).
        empty_init: create the model on the meta device and initialise only this rank's stages. Default
            False: the whole model is created on the CPU (as `configure_model` builds it, pretrained or
            loaded weights included) and pruned to this rank's stages.
        process_group_backend: torch.distributed backend; default nccl on GPUs, gloo on CPUs.
        timeout: timeout of collective operations.
    """

    _pipeline_degree = "stages"

    def __init__(
        self,
        stages: int = 2,
        microbatches: int = 4,
        schedule: str = "1f1b",
        *,
        stages_per_rank: int | None = None,
        split_points: list[int] | None = None,
        zero_stage: int = 2,
        empty_init: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(pipeline_parallel=stages, zero_stage=zero_stage, microbatches=microbatches, schedule=schedule,
                         stages_per_rank=stages_per_rank, split_points=split_points, empty_init=empty_init,
                         process_group_backend=process_group_backend, timeout=timeout)

    @property
    def stages(self) -> int:
        return self.pipeline_parallel

    @property
    def microbatches(self) -> int:
        return self._pipeline.microbatches

    @property
    def schedule(self) -> str:
        return self._pipeline.schedule
