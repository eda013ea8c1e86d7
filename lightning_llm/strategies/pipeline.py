"""Pipeline parallelism on `torch.distributed.pipelining`: `Pipeline`, one rank's part of a pipeline, which
`ParallelStrategy(pipeline_parallel=...)` and its one-dimension form `PipelineStrategy` run (both in
strategies/parallel.py; `PipelineStrategy` is importable from here too).

The decoder layers of a Hugging Face causal LM are split into stages on different ranks (embedding
on the first, final norm and LM head on the last), and each batch is streamed through them as
micro-batches by one of torch's schedules (GPipe, 1F1B, interleaved 1F1B, interleaved zero bubble).
When there are more ranks than stages, each stage is sharded by ZeRO over the ranks that hold it in
the other pipelines (the data-parallel dimension of the strategy's mesh), which also reduces its gradients.

How it fits Lightning's loop: in automatic optimization the loop calls `training_step`, zeroes the
gradients, calls `backward`, then the precision plugin's `optimizer_step` (unscale, clip, step).
A pipeline schedule cannot be cut into a forward and a backward half (1F1B interleaves them per
micro-batch), so `training_step` runs the whole schedule in place of the module's `training_step`
and returns the loss; the last stage computes each micro-batch's loss with the module's own `loss_sum`,
and the module logs the step through its `log_training_step` (lightning_llm.protocols.PipelinedTraining),
so its metrics are those of any other layout. The gradients it produced are held aside while the loop zeroes, and handed
over (after the tied-embedding all-reduce) in `backward`, which runs the usual
hooks but no second backward pass. Everything after that is Lightning's own path, so the precision
plugin's overflow check and step work unchanged; gradient clipping is made global across stages.

Validation, test and predict steps of the module run unchanged: while they run, the causal LM's
`forward` is redirected to a forward-only pass through the pipeline whose logits are broadcast
from the last stage to every rank (the same redirection Lightning uses for wrapped models). A benchmark
callback's evaluation runs inside the same redirection (`Pipeline.redirected`), so lm-eval's scoring and
`generate` see the whole model's logits on every rank of the pipeline; generation then runs without a KV
cache (each step passes the whole sequence through the stages), and its ever longer sequences are padded
to a few lengths per octave, so that a bounded cache of schedules serves them (`padded_length`).

Every stage keeps its layers under the single-process names, so the strategy's checkpoints (ZeRO's
sharded format, `lightning_llm.checkpoint`) join on one process and resume under any layout.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.tensor import DTensor
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from lightning_llm.protocols import PipelinedTraining

SCHEDULES: dict[str, type] = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved-1f1b": ScheduleInterleaved1F1B,
    "interleaved-zero-bubble": ScheduleInterleavedZeroBubble,
}
# Schedules that run several model chunks ("virtual stages") per rank, placed in a loop:
# rank r holds stages r, r + p, r + 2p, ...
MULTI_STAGE_SCHEDULES = {"interleaved-1f1b", "interleaved-zero-bubble"}
# Schedules that split each backward into its input half and a later weight half; torch computes the weight
# gradients with torch.autograd.grad and assigns them, so no gradient-accumulation hook fires for them.
SPLIT_BACKWARD_SCHEDULES = {"interleaved-zero-bubble"}


# Forward-only schedules kept for evaluation shapes (each holds its stages' buffers for its shape), least
# recently used dropped first: generation asks for a new sequence length at every step.
EVAL_SCHEDULES_KEPT = 8


def padded_length(n: int, multiple: int = 1) -> int:
    """`n` rounded up to one of four lengths per octave (..., 16, 20, 24, 28, 32, 40, 48, ...): at most 25%
    padding, and a growing sequence (generation without a KV cache) meets a new length only every few tokens;
    then up to a `multiple` (the tensor-parallel degree under sequence parallelism, whose ranks must hold equal
    shares of the sequence to send between stages)."""
    step = 2 ** max(n.bit_length() - 3, 0)
    return -(-(-(-n // step) * step) // multiple) * multiple


def schedule_accepts(schedule: str, microbatches: int, stages: int) -> bool:
    """Whether torch's `schedule` runs a batch of `microbatches` micro-batches on `stages` pipeline ranks.

    torch checks this only when the schedule is built, at the first step of that batch shape. 1F1B
    needs a micro-batch per stage for its warm-up; the interleaved schedules run the micro-batches in
    max(1, m // stages) rounds that must divide m; GPipe takes any number.
    """
    if schedule == "1f1b":
        return microbatches >= stages
    if schedule in MULTI_STAGE_SCHEDULES:
        return microbatches % max(1, microbatches // stages) == 0
    return True


# -- splitting a Hugging Face decoder ------------------------------------------------------------


@dataclass
class DecoderParts:
    """The pieces of a Hugging Face decoder-only causal LM that a pipeline distributes."""

    causal_lm: nn.Module
    decoder: nn.Module  # the base model holding embed_tokens, layers, norm, rotary_emb
    embed_tokens: nn.Module
    layers: list[nn.Module]
    norm: nn.Module
    rotary_emb: nn.Module
    lm_head: nn.Module

    @property
    def tied(self) -> bool:
        return self.lm_head.weight is self.embed_tokens.weight


def decoder_parts(causal_lm: nn.Module) -> DecoderParts:
    """Find embedding, decoder layers, final norm, rotary embedding and LM head of a HF causal LM.

    The names come from the model's own pipeline plan (`config.base_model_pp_plan`, which transformers
    ships for its decoder models), so any model laid out like Llama (Mistral, Qwen2/3, ...) splits.
    Raises ValueError naming what is missing for a model that cannot be split.
    """
    config = getattr(causal_lm, "config", None)
    plan = getattr(config, "base_model_pp_plan", None)
    if not plan:
        raise ValueError(
            f"{type(causal_lm).__name__} cannot be split into pipeline stages: it is not a Hugging Face model with "
            "a pipeline plan (config.base_model_pp_plan). Supported: decoder-only causal LMs laid out like Llama "
            "(embed_tokens, layers, norm, rotary_emb, lm_head)."
        )
    decoder = getattr(causal_lm, getattr(causal_lm, "base_model_prefix", "model"), None)
    found = {name: getattr(decoder, name, None) for name in ("embed_tokens", "layers", "norm", "rotary_emb")}
    found["lm_head"] = getattr(causal_lm, "lm_head", None)
    missing = [name for name, module in found.items() if not isinstance(module, nn.Module)]
    if missing or set(plan) - {"embed_tokens", "layers", "norm"}:
        raise ValueError(
            f"{type(causal_lm).__name__} cannot be split into pipeline stages: missing {missing or 'nothing'}, "
            f"pipeline plan {sorted(plan)}; expected embed_tokens, layers, norm, rotary_emb on the base model and "
            "lm_head on the causal LM (the Llama layout)."
        )
    return DecoderParts(causal_lm, decoder, found["embed_tokens"], list(found["layers"]), found["norm"],
                        found["rotary_emb"], found["lm_head"])


def balanced_split(layer_costs: list[int], n_stages: int, last_stage_extra: int = 0) -> list[int]:
    """Split points (index of each stage's first layer, stage 0 excluded) of a contiguous partition of
    the layers into `n_stages` non-empty stages that minimises the largest stage cost.

    `last_stage_extra` is added to the last stage (the LM head's parameters). Exact dynamic programme
    over contiguous partitions: O(stages x layers^2), nothing for a few hundred layers.
    """
    n = len(layer_costs)
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot split {n} decoder layers into {n_stages} stages: every stage needs at least one layer")
    prefix = [0]
    for cost in layer_costs:
        prefix.append(prefix[-1] + cost)
    # best[s][i]: smallest achievable max cost of layers[i:] split into s stages (the last one carries the extra)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    for i in range(n):
        best[1][i] = prefix[n] - prefix[i] + last_stage_extra
    for s in range(2, n_stages + 1):
        for i in range(n - s + 1):
            for j in range(i + 1, n - s + 2):
                cost = max(prefix[j] - prefix[i], best[s - 1][j])
                if cost < best[s][i]:
                    best[s][i], cut[s][i] = cost, j
    points, i = [], 0
    for s in range(n_stages, 1, -1):
        i = cut[s][i]
        points.append(i)
    return points


def stage_layer_ids(n_layers: int, split_points: list[int]) -> list[list[int]]:
    """The decoder-layer indices of each stage, from the split points."""
    bounds = [0, *split_points, n_layers]
    return [list(range(bounds[s], bounds[s + 1])) for s in range(len(bounds) - 1)]


class DecoderStage(nn.Module):
    """One pipeline stage: the causal LM's own submodules for a range of decoder layers.

    Its forward is the decoder's forward restricted to those layers: the first stage embeds the
    tokens, every stage builds the causal mask and rotary embeddings from the (micro-batch's)
    position ids, the last stage applies the final norm and the LM head and returns logits.

    `residual_layout` (mesh, placements): the layout of a residual stream kept as a `DTensor` (sequence
    parallelism), which torch's stages cannot send: it leaves a stage as its local shard and is
    rebuilt from it on arrival.
    """

    def __init__(self, parts: DecoderParts, layer_ids: list[int], is_first: bool, is_last: bool,
                 residual_layout: tuple[Any, tuple[Any, ...]] | None = None) -> None:
        super().__init__()
        self.residual_layout = residual_layout
        self.config = parts.causal_lm.config
        self.layer_ids = layer_ids
        self.embed_tokens = parts.embed_tokens if is_first else None
        # A ModuleDict keyed by the layer's index in the full model, so names match the full model's.
        self.layers = nn.ModuleDict({str(i): parts.layers[i] for i in layer_ids})
        self.rotary_emb = parts.rotary_emb
        self.norm = parts.norm if is_last else None
        self.lm_head = parts.lm_head if is_last else None

    def forward(self, x: Tensor, position_ids: Tensor | None = None, attention_mask: Tensor | None = None) -> Tensor:
        if self.embed_tokens is not None:
            hidden = self.embed_tokens(x)
        elif self.residual_layout is not None:
            hidden = DTensor.from_local(x, *self.residual_layout, run_check=False)
        else:
            hidden = x
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=None, position_ids=position_ids)
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers.values():
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids,
                           position_embeddings=position_embeddings, use_cache=False)
        if self.lm_head is not None:
            return self.lm_head(self.norm(hidden))
        return hidden.to_local() if isinstance(hidden, DTensor) else hidden


def check_split(parts: DecoderParts, layer_ids: list[list[int]]) -> None:
    """Raise ValueError unless the stages, run one after another, give the full model's logits.

    A model whose forward does more than embed -> layers -> norm -> head (scaled embeddings, soft-capped
    logits, ...) would otherwise train silently wrong; one short forward pass at setup rules that out.
    """
    model = parts.causal_lm
    stages = [DecoderStage(parts, ids, s == 0, s == len(layer_ids) - 1) for s, ids in enumerate(layer_ids)]
    device = parts.embed_tokens.weight.device
    tokens = torch.arange(8, device=device).remainder(parts.embed_tokens.num_embeddings).unsqueeze(0)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=tokens, use_cache=False).logits
        hidden = tokens
        for stage in stages:
            hidden = stage(hidden)
    model.train(was_training)
    if hidden.shape != expected.shape or not torch.allclose(hidden.float(), expected.float(), rtol=1e-4, atol=1e-5):
        raise ValueError(
            f"{type(model).__name__} cannot be split into pipeline stages: running its parts in sequence "
            "(embed_tokens -> layers -> norm -> lm_head) does not reproduce its logits, so its forward does more "
            "than the Llama layout"
        )


def prune_to_stages(parts: DecoderParts, keep_layers: list[int], keep_first: bool, keep_last: bool) -> None:
    """Remove from the causal LM, in place, everything this rank's stages do not hold.

    What stays keeps its name, so the LightningModule's state dict and optimizer hold only this rank's
    parameters under the same keys a single process would use. With tied embeddings the last stage
    keeps `embed_tokens` as the owner of the LM head's weight: its own copy, kept equal by summing the
    two copies' gradients (see `Pipeline.backward`).
    """
    decoder, causal_lm = parts.decoder, parts.causal_lm
    decoder.layers = nn.ModuleDict({str(i): parts.layers[i] for i in keep_layers})
    if not (keep_first or (keep_last and parts.tied)):
        decoder.embed_tokens = None
    if not keep_last:
        decoder.norm = None
        causal_lm.lm_head = None


# -- one rank's pipeline -------------------------------------------------------------------------


def causal_lm_of(module: nn.Module) -> nn.Module:
    """The LightningModule's Hugging Face causal LM: `pipeline_model()` if defined, else `.model`."""
    hook = getattr(module, "pipeline_model", None)
    model = hook() if callable(hook) else getattr(module, "model", None)
    if not isinstance(model, nn.Module) or not any(m is model for m in module.modules()):
        raise ValueError(
            f"pipeline parallelism needs the causal LM as a submodule of {type(module).__name__}: set it as "
            "`self.model` (in __init__ or configure_model) or return it from a method `pipeline_model()`"
        )
    return model


class Pipeline:
    """This rank's part of a pipeline: its stages of the causal LM, torch's schedules that stream the
    micro-batches through them, the module's loss on the last stage, and evaluation through the stages.

    The strategy that runs a pipeline (`ParallelStrategy` with pipeline_parallel > 1, and `PipelineStrategy`,
    its one-dimension form) owns the processes, the sharding of each stage over the data dimension (ZeRO,
    which reduces the gradients) and the checkpoints; this object owns what happens within one pipeline.

    Args:
        size: pipeline ranks p (named `degree` in error messages).
        microbatches, schedule, stages_per_rank, split_points: as `PipelineStrategy` documents them.
        degree: the name of `size` among the strategy's arguments ("stages", "pipeline_parallel").
    """

    def __init__(self, size: int, microbatches: int, schedule: str, stages_per_rank: int | None = None,
                 split_points: list[int] | None = None, degree: str = "stages") -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not known; use one of {', '.join(map(repr, SCHEDULES))}")
        if not isinstance(size, int) or size < 2:
            raise ValueError(f"{degree}={size!r}: a pipeline needs an integer number of stages >= 2")
        if not isinstance(microbatches, int) or microbatches < 1:
            raise ValueError(f"microbatches={microbatches!r}: must be an integer >= 1")
        multi = schedule in MULTI_STAGE_SCHEDULES
        stages_per_rank = (2 if multi else 1) if stages_per_rank is None else stages_per_rank
        if not isinstance(stages_per_rank, int) or stages_per_rank < 1 or (not multi and stages_per_rank != 1):
            accepted = "an integer >= 1" if multi else "1 (use an interleaved schedule for more)"
            raise ValueError(f"stages_per_rank={stages_per_rank!r} with schedule={schedule!r}: accepted is {accepted}")
        if not schedule_accepts(schedule, microbatches, size):
            if schedule == "1f1b":
                fix = f"1F1B needs a micro-batch per stage: use microbatches >= {size} or schedule='gpipe'"
            else:
                lower = max(m for m in range(1, microbatches) if schedule_accepts(schedule, m, size))
                upper = min(m for m in range(microbatches + 1, microbatches + size + 1)
                             if schedule_accepts(schedule, m, size))
                fix = (f"the interleaved schedules run the micro-batches in {microbatches // size} equal rounds: "
                       f"use microbatches={lower} or {upper} (any multiple of stages)")
            raise ValueError(f"microbatches={microbatches} with schedule={schedule!r} and {degree}={size}: {fix}")
        n_stages = size * stages_per_rank
        if split_points is not None:
            split_points = list(split_points)
            if len(split_points) != n_stages - 1 or split_points != sorted(set(split_points)) or split_points[0] < 1:
                raise ValueError(
                    f"split_points={split_points!r}: need {n_stages - 1} strictly increasing layer indices >= 1 "
                    f"(the first layer of stages 1..{n_stages - 1})"
                )
        self.size, self.microbatches, self.schedule = size, microbatches, schedule
        self.stages_per_rank, self.split_points, self.degree = stages_per_rank, split_points, degree
        self.strategy: Any = None
        self.rank = 0
        self.group: dist.ProcessGroup | None = None
        self.data_group: dist.ProcessGroup | None = None
        self.tied_group: dist.ProcessGroup | None = None
        self.residual_layout: tuple[Any, tuple[Any, ...]] | None = None
        self.stage_ids: list[int] = []
        self.stage_modules: list[nn.Module] = []
        self._schedules: dict[tuple, Any] = {}
        self._eval_schedules: OrderedDict[tuple, Any] = OrderedDict()
        self._pending_grads: dict[nn.Parameter, Tensor] = {}
        self._loss_normalizer: Tensor | None = None
        self._microbatch_losses: list[Tensor] = []
        self._averages_replicas = False

    def connect(self, strategy: Any, rank: int, group: dist.ProcessGroup, data_group: dist.ProcessGroup | None,
                tied_group: dist.ProcessGroup | None, residual_layout: tuple[Any, tuple[Any, ...]] | None = None) -> None:
        """Place this rank: `rank` in the pipeline `group`; `data_group`: the ranks holding the same stages in
        the other pipelines (their losses and target counts are averaged); `tied_group`: this pipeline's first
        and last stage ranks (the two copies of a tied embedding); `residual_layout`: see `DecoderStage`."""
        self.strategy, self.rank, self.group, self.data_group, self.tied_group = strategy, rank, group, data_group, tied_group
        self.residual_layout = residual_layout

    @property
    def n_stages(self) -> int:
        return self.size * self.stages_per_rank

    @property
    def holds_first_stage(self) -> bool:
        return 0 in self.stage_ids

    @property
    def holds_last_stage(self) -> bool:
        return self.n_stages - 1 in self.stage_ids

    @property
    def data_parallel_size(self) -> int:
        return dist.get_world_size(self.data_group) if self.data_group is not None else 1

    def _last_stage_rank(self) -> int:
        """Global rank of this pipeline's last stage (stage S-1 sits on pipeline rank p-1)."""
        return dist.get_global_rank(self.group, self.size - 1)

    # -- splitting -------------------------------------------------------------------------------

    def split(self, module: nn.Module) -> nn.Module:
        """Prune the LightningModule's causal LM, in place, to this rank's stages (meta tensors are fine);
        build the stage modules over what stays. Returns the causal LM."""
        if not isinstance(module, PipelinedTraining):
            raise TypeError(
                f"{type(module).__name__} cannot be trained through a pipeline: it must define `loss_sum(logits, "
                "targets)` and `log_training_step(batch, loss)` (lightning_llm.protocols.PipelinedTraining; "
                "PretrainModule and InstructionTuningModule do)"
            )
        model = causal_lm_of(module)
        if getattr(model, "_pipeline_stage_ids", None) is None:  # not split by an earlier fit/validate of this module
            parts = decoder_parts(model)
            n_layers, n_stages = len(parts.layers), self.n_stages
            if n_stages > n_layers:
                raise ValueError(
                    f"{n_stages} pipeline stages ({self.degree}={self.size} x stages_per_rank={self.stages_per_rank}) "
                    f"but the model has only {n_layers} decoder layers: use at most {n_layers} stages"
                )
            if self.split_points is not None and self.split_points[-1] >= n_layers:
                raise ValueError(f"split_points={self.split_points!r}: the model has {n_layers} layers (indices < {n_layers})")
            costs = [sum(p.numel() for p in layer.parameters()) for layer in parts.layers]
            points = self.split_points or balanced_split(costs, n_stages, sum(p.numel() for p in parts.lm_head.parameters()))
            layer_ids = stage_layer_ids(n_layers, points)
            if parts.embed_tokens.weight.device.type != "meta":
                check_split(parts, layer_ids)
            stage_ids = list(range(self.rank, n_stages, self.size))
            prune_to_stages(parts, [i for s in stage_ids for i in layer_ids[s]], 0 in stage_ids, n_stages - 1 in stage_ids)
            model._pipeline_stage_ids = stage_ids
            model._pipeline_layer_ids = [layer_ids[s] for s in stage_ids]
            model._pipeline_tied = parts.tied
        self.build_stages(model)
        return model

    def build_stages(self, model: nn.Module) -> None:
        """The stage modules over the (pruned) causal LM's submodules, built once per model: a later run of the
        same module (fit, then validate with a new Trainer) keeps them, as the roots its sharding was made on."""
        self.stage_ids = model._pipeline_stage_ids
        stages = getattr(model, "_pipeline_stages", None)
        if stages is None:
            decoder = getattr(model, getattr(model, "base_model_prefix", "model"))
            holder = DecoderParts(model, decoder, decoder.embed_tokens, [], decoder.norm, decoder.rotary_emb, model.lm_head)
            stages = []
            for stage_id, layer_ids in zip(self.stage_ids, model._pipeline_layer_ids):
                holder.layers = {i: decoder.layers[str(i)] for i in layer_ids}
                stages.append(DecoderStage(holder, layer_ids, stage_id == 0, stage_id == self.n_stages - 1))
            model._pipeline_stages = stages  # (a plain list: not submodules of the model, nothing in its state dict)
        for stage in stages:
            stage.residual_layout = self.residual_layout
        self.stage_modules = list(stages)
        self._schedules, self._eval_schedules = {}, OrderedDict()

    def _tied_embedding(self) -> nn.Parameter | None:
        """This rank's copy of a tied embedding (first or last stage), else None."""
        model = causal_lm_of(self.strategy.lightning_module)
        if not model._pipeline_tied or not (self.holds_first_stage or self.holds_last_stage):
            return None
        return getattr(model, getattr(model, "base_model_prefix", "model")).embed_tokens.weight

    @property
    def tied_param(self) -> nn.Parameter | None:
        """The last stage's second copy of a tied embedding (its LM head's weight), if this rank holds one."""
        return self._tied_embedding() if self.holds_last_stage and not self.holds_first_stage else None

    def retie(self) -> None:
        """Point the embedding that the last stage keeps (as the owner of a tied LM head's weight) at the LM
        head's weight again, after materialising or sharding the stage gave the head a new parameter (the
        embedding is outside the stage's module, so neither saw it)."""
        model = causal_lm_of(self.strategy.lightning_module)
        if model._pipeline_tied and self.holds_last_stage and not self.holds_first_stage:
            getattr(model, getattr(model, "base_model_prefix", "model")).embed_tokens.weight = model.lm_head.weight

    @property
    def splits_backward(self) -> bool:
        return self.schedule in SPLIT_BACKWARD_SCHEDULES

    def replicate_by_hand(self) -> None:
        """Replicate the stages over the data dimension without DistributedDataParallel (ZeRO-1 under a schedule
        that `splits_backward`): DDP's reducer all-reduces from the gradient-accumulation hooks, which the weight
        half of a split backward never fires (torch reduces FSDP's gradients by hand after it, not DDP's), so it
        would leave the replicas' gradients apart. The stages start equal here (the data group's first rank's
        parameters and buffers, as DDP's constructor broadcasts them) and `backward` averages the gradients."""
        src = dist.get_global_rank(self.data_group, 0)
        with torch.no_grad():
            for stage in self.stage_modules:
                for t in itertools.chain(stage.parameters(), stage.buffers()):
                    dist.broadcast(t, src=src, group=self.data_group)
        self._averages_replicas = True

    def broadcast_tied(self) -> None:
        """The last stage copies the first stage's tied embedding (its local shard, under ZeRO: the same cut)."""
        tied = self._tied_embedding()
        if tied is not None and self.tied_group is not None:
            with torch.no_grad():
                dist.broadcast(_local(tied), src=dist.get_global_rank(self.group, 0), group=self.tied_group)

    # -- training --------------------------------------------------------------------------------

    def schedule_for(self, train: bool, shape: tuple[int, ...], kwarg_names: tuple[str, ...]) -> Any:
        """The schedule for a batch of this shape (torch infers stage shapes at the first step, so each
        shape gets its own stages; a training run sees one or two shapes).

        Evaluation batches can have any size (a smaller last batch, another batch size): a forward-only
        pass runs the same forwards under GPipe as under 1F1B (whose micro-batch minimum serves only its
        backward) and under interleaved 1F1B as under zero bubble, and takes the largest count that
        divides the batch and the schedule accepts.
        """
        if train:
            schedule, n_microbatches = self.schedule, self.microbatches
        else:
            schedule = "interleaved-1f1b" if self.schedule in MULTI_STAGE_SCHEDULES else "gpipe"
            most = math.gcd(shape[0], self.microbatches)
            n_microbatches = max(m for m in range(1, most + 1)
                                 if most % m == 0 and schedule_accepts(schedule, m, self.size))
        key = (train, shape, kwarg_names, n_microbatches)
        cache = self._schedules if train else self._eval_schedules
        if key in cache:
            if not train:
                self._eval_schedules.move_to_end(key)
            return cache[key]
        device = self.strategy.root_device
        stages = [PipelineStage(module, stage_id, self.n_stages, device, group=self.group)
                  for module, stage_id in zip(self.stage_modules, self.stage_ids)]
        cls = SCHEDULES[schedule]
        loss_fn = self._microbatch_loss if train else None
        # scale_grads=False: `_microbatch_loss` already divides by what makes the batch loss, which
        # stays right under gradient accumulation (torch's scaling would rescale accumulated grads).
        if self.schedule in MULTI_STAGE_SCHEDULES:
            cache[key] = cls(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
        else:
            cache[key] = cls(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
        if not train and len(cache) > EVAL_SCHEDULES_KEPT:
            # Every rank of the pipeline (and, the shapes being agreed on, of every pipeline) sees the same
            # shapes in the same order, so they all drop the same schedule.
            cache.popitem(last=False)
        return cache[key]

    def _microbatch_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The loss the schedule backpropagates for one micro-batch: its share of the batch loss, from the
        module's own `loss_sum`."""
        module = self.strategy.lightning_module
        loss = module.loss_sum(logits, targets) / self._loss_normalizer
        self._microbatch_losses.append(loss.detach())
        # Lightning divides the returned loss by the accumulation steps before backward; do the same here.
        loss = loss / module.trainer.accumulate_grad_batches
        scaler = getattr(self.strategy.precision_plugin, "scaler", None)  # fp16 loss scaling (torch's GradScaler API)
        if scaler is not None and scaler.is_enabled():
            loss = scaler.scale(loss)
        return loss

    @staticmethod
    def unpack(batch: Any) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ValueError(
                "a pipeline expects batches as dicts with 'input_ids' [B, T], 'targets' [B, T] and optional "
                f"'position_ids' / 'attention_mask'; got {type(batch).__name__}"
                + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else "")
            )
        kwargs = {k: batch[k] for k in ("position_ids", "attention_mask") if batch.get(k) is not None}
        return batch["input_ids"], batch.get("targets"), kwargs

    def check_divisible(self, batch_size: int) -> None:
        if batch_size % self.microbatches:
            raise ValueError(
                f"a batch of {batch_size} samples per pipeline cannot be split into microbatches={self.microbatches}: "
                f"use a batch size that is a multiple of {self.microbatches} (and drop_last=True if the dataset "
                "leaves a smaller last batch)"
            )

    def check_loader(self, loader: Any) -> None:
        """Setup-time check of the micro-batch split, before any step runs (the step checks again)."""
        batch_size = getattr(loader, "batch_size", None)
        if isinstance(batch_size, int):
            self.check_divisible(batch_size)
            sampler_len = len(loader.sampler) if hasattr(loader.sampler, "__len__") else None
            if not loader.drop_last and sampler_len is not None and sampler_len % batch_size:
                self.check_divisible(sampler_len % batch_size)

    def training_step(self, batch: Any) -> Tensor:
        """Run the schedule over the batch in place of the module's training_step; the module logs the step.
        Returns the global batch's loss (on every rank); the gradients are held aside for `backward`."""
        module = self.strategy.lightning_module
        input_ids, targets, kwargs = self.unpack(batch)
        if targets is None:
            raise ValueError("the training batch has no 'targets' for the pipeline's last stage's loss")
        self.check_divisible(input_ids.shape[0])
        schedule = self.schedule_for(True, tuple(input_ids.shape), tuple(sorted(kwargs)))
        # Replicas (dp > 1) can hold different numbers of target tokens: each divides its summed loss by
        # the mean count over replicas, so the averaged gradients are the global batch's token mean.
        count = (targets != -100).sum().to(torch.float32)
        if self.data_parallel_size > 1:
            dist.all_reduce(count, group=self.data_group)
            count /= self.data_parallel_size
        self._loss_normalizer = count.clamp(min=1)
        self._microbatch_losses = []
        params = [p for p in module.parameters() if p.requires_grad]
        held = {p: p.grad for p in params}
        for p in params:
            p.grad = None
        with self.strategy.precision_plugin.train_step_context():
            schedule.step(*((input_ids,) if self.holds_first_stage else ()),
                          target=targets if self.holds_last_stage else None, **kwargs)
        self._pending_grads = {}
        for p, grad in held.items():
            if p.grad is not None:
                self._pending_grads[p] = p.grad
            p.grad = grad
        # On its first step torch calls the loss once more, on placeholder tensors, to infer gradient shapes
        # (before the real micro-batches): the batch loss is the sum of the last m calls.
        shares = self._microbatch_losses[-schedule._n_microbatches:]
        # (fp32 on every stage: a precision plugin may have made the default dtype 16-bit)
        device = self.strategy.root_device
        loss = torch.stack(shares).sum() if shares else torch.zeros((), dtype=torch.float32, device=device)
        dist.broadcast(loss, src=self._last_stage_rank(), group=self.group)
        if self.data_parallel_size > 1:  # the global batch's loss, on every rank
            dist.all_reduce(loss, group=self.data_group)
            loss /= self.data_parallel_size
        module.log_training_step(batch, loss)
        return loss

    def backward(self, closure_loss: Tensor) -> Tensor:
        """Lightning's backward for a step the schedule already ran: the loop zeroed the gradients since, so
        this step's gradients, held aside (already reduced over the data dimension by each stage's ZeRO), are
        handed over here, and the tied embedding's two copies summed."""
        strategy, module = self.strategy, self.strategy.lightning_module
        closure_loss = strategy.precision_plugin.pre_backward(closure_loss, module)
        grads, self._pending_grads = self._pending_grads, {}
        if self._averages_replicas and self.data_parallel_size > 1:  # (see `replicate_by_hand`)
            works = [dist.all_reduce(grad, group=self.data_group, async_op=True) for grad in grads.values()]
            for work, grad in zip(works, grads.values()):
                work.wait()
                grad.div_(self.data_parallel_size)
        tied = self._tied_embedding()
        if tied is not None and self.tied_group is not None:
            dist.all_reduce(_local(grads.setdefault(tied, torch.zeros_like(tied))), group=self.tied_group)
        for p, grad in grads.items():
            p.grad = grad if p.grad is None else p.grad.add_(grad)
        return strategy.precision_plugin.post_backward(closure_loss, module)

    def make_clipping_global(self) -> None:
        """Clip by the norm of the whole model's gradient, not of this stage's.

        Lightning clips in the precision plugin (after unscaling, before the step), which sees only the
        local gradients; the global norm needs the pipeline group, which only the strategy knows, so
        the plugin's norm clipping is replaced on this instance. The tied embedding's second copy is
        left out of the norm (it equals the first), found as what the optimizer steps for it
        (`tied_copy_stepped`). Under ZeRO the gradients are shards (`DTensor`), whose norm torch takes
        over the data-parallel ranks.
        """
        plugin = self.strategy.precision_plugin
        pipeline = self

        def clip_grad_by_norm(optimizer: torch.optim.Optimizer, clip_val: float) -> None:
            params = [p for p in plugin.main_params(optimizer) if p.grad is not None]
            tied = pipeline.tied_copy_stepped()
            counted = [p.grad for p in params if p is not tied]
            norm = torch.nn.utils.get_total_norm(counted) if counted else torch.zeros((), device=pipeline.strategy.root_device)
            squared = _full(norm).float().pow(2)
            dist.all_reduce(squared, group=pipeline.group)
            torch.nn.utils.clip_grads_with_norm_(params, clip_val, squared.sqrt())

        plugin.clip_grad_by_norm = clip_grad_by_norm

    def tied_copy_stepped(self) -> Tensor | None:
        """The tensor an optimizer steps for this rank's second copy of the tied embedding, if it holds one:
        the parameter, its ZeRO-1 shard, or the fp32 master standing in for either (the strategy's `stand_ins`)."""
        tied = self.tied_param
        return None if tied is None else self.strategy.stand_ins()[id(tied)]

    # -- evaluation through the pipeline ---------------------------------------------------------

    def _pipelined_forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                           position_ids: Tensor | None = None, logits_to_keep: int | Tensor = 0,
                           use_cache: bool | None = None, past_key_values: Any = None, **extra: Any) -> CausalLMOutputWithPast:
        """Forward-only pass through the pipeline; every rank of the pipeline gets the logits, of the positions
        that `logits_to_keep` names as transformers' causal LMs take it (an int: the last ones, 0: all; a tensor:
        those positions).

        The batch is padded, rows and positions, to the largest shape among the pipeline's data-parallel
        replicas, its length rounded up by `padded_length`: the replicas then run the same schedule (under ZeRO
        each micro-batch's gathers are collectives over them) and a few shapes serve a whole evaluation. Padding
        after a row's end changes none of its logits (attention is causal), nor does a padded row another's.
        """
        if use_cache or past_key_values is not None:
            raise ValueError("the pipeline's forward keeps no KV cache (each call runs the whole sequence through "
                             "the stages): call it, and `generate`, with use_cache=False")
        _refuse_unsupported(extra)
        device = self.strategy.root_device
        batch, length = input_ids.shape
        sequence_shards = self.residual_layout[0].size() if self.residual_layout is not None else 1
        shape = torch.tensor([batch, padded_length(length, sequence_shards)], device=device)
        if self.data_parallel_size > 1:
            dist.all_reduce(shape, op=dist.ReduceOp.MAX, group=self.data_group)
        rows, width = shape.tolist()
        # Padding: token 0, attended (1) so that no padded query sees only masked keys, position 0.
        kwargs = {name: _padded(t.expand(batch, -1), rows, width, fill)
                  for name, t, fill in (("position_ids", position_ids, 0), ("attention_mask", attention_mask, 1))
                  if t is not None}
        schedule = self.schedule_for(False, (rows, width), tuple(sorted(kwargs)))
        with torch.no_grad():
            out = schedule.step(*((_padded(input_ids, rows, width, 0),) if self.holds_first_stage else ()), **kwargs)
        _release_step_outputs(schedule)
        if isinstance(logits_to_keep, Tensor):
            kept: Any = logits_to_keep.to(device)
            n_kept = len(kept)
        else:
            kept, n_kept = slice(length - logits_to_keep if logits_to_keep else 0, length), logits_to_keep or length
        vocab = causal_lm_of(self.strategy.lightning_module).config.vocab_size
        if self.holds_last_stage:
            logits = out[:batch, kept].float().contiguous()
        else:
            logits = torch.empty((batch, n_kept, vocab), device=device)
        dist.broadcast(logits, src=self._last_stage_rank(), group=self.group)
        return CausalLMOutputWithPast(logits=logits)

    @contextmanager
    def redirected(self) -> Iterator[None]:
        """While inside, the causal LM's forward is `_pipelined_forward` (the same redirection Lightning uses for
        wrapped models): the module's evaluation steps, lm-eval's scoring and `generate` get the whole model's
        logits on every rank of the pipeline, which must all make the same calls on the same inputs."""
        model = causal_lm_of(self.strategy.lightning_module)
        if "forward" in model.__dict__:  # already redirected (an evaluation inside a step)
            yield
            return
        model.forward = self._pipelined_forward
        try:
            yield
        finally:
            del model.forward

    def evaluation_step(self, step: str, context: Any, *args: Any, **kwargs: Any) -> Any:
        """Run the module's `step` (validation_step, ...) with the causal LM's forward redirected through the
        pipeline."""
        with self.redirected(), context:
            return getattr(self.strategy.lightning_module, step)(*args, **kwargs)

    def join_stages(self, local: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
        """The stages' weights joined on global rank 0, None elsewhere (every rank calls this). `local`: this
        rank's stages' whole weights on the ranks of the pipeline holding global rank 0 (the others hold the
        same numbers: other replicas, other tensor-parallel ranks), None on every other rank."""
        state: dict[str, Tensor] | None = None
        if local is not None:
            parts: list[Any] | None = [None] * self.size if dist.get_rank() == 0 else None
            dist.gather_object(local, parts, dst=0, group=self.group)
            if parts is not None:
                state = {name: t for part in parts for name, t in part.items()}
        dist.barrier()
        return state

    def teardown(self) -> None:
        self._schedules, self._eval_schedules, self._pending_grads = {}, OrderedDict(), {}


def _local(t: Tensor) -> Tensor:
    """The local tensor of a `DTensor` (a ZeRO shard), or `t`."""
    return t.to_local() if isinstance(t, DTensor) else t


def _release_step_outputs(schedule: Any) -> None:
    """Drop what a step leaves in its stages until the next step of the same schedule (each micro-batch's outputs,
    kept for a backward, and the output chunks): a kept evaluation schedule would otherwise hold on to its last
    logits. torch clears the same at the start of every step; its schedules hold their stages as `_stage` (one
    per rank) or `_stages`."""
    for stage in getattr(schedule, "_stages", None) or [schedule._stage]:
        stage.clear_runtime_states()


def _asks_nothing(name: str, value: Any) -> bool:
    """Whether a keyword of a causal LM's forward asks for nothing the pipelined forward would drop: None, an
    `output_*=False`, generation's cache positions (no cache is kept) or `return_dict=True` (it returns one)."""
    return (value is None or (name.startswith("output_") and value is False) or name == "cache_position"
            or (name == "return_dict" and value is True))


def _refuse_unsupported(extra: dict[str, Any]) -> None:
    """Refuse what the pipelined forward cannot give (hidden states, a loss from labels, router logits, a tuple
    output) rather than drop it, naming the keyword."""
    refused = sorted(name for name, value in extra.items() if not _asks_nothing(name, value))
    if refused:
        shown = ", ".join(f"{name}=<tensor>" if isinstance(extra[name], Tensor) else f"{name}={extra[name]!r}"
                          for name in refused)
        raise ValueError(f"the pipeline's forward returns the logits only (input_ids, attention_mask, position_ids, "
                         f"logits_to_keep); it cannot give {shown}: evaluate without them, or without pipeline "
                         f"parallelism")


def _padded(t: Tensor, rows: int, width: int, fill: int) -> Tensor:
    """`t` [batch, length] in the top left corner of a [rows, width] tensor filled with `fill`."""
    if t.shape == (rows, width):
        return t
    out = torch.full((rows, width), fill, dtype=t.dtype, device=t.device)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def _full(t: Tensor) -> Tensor:
    """The whole value of a `DTensor` (a norm reduced over its mesh), or `t`."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def tied_groups(pipelines: Tensor) -> dist.ProcessGroup | None:
    """This rank's group of the first and last stage of its pipeline, from the global ranks of every pipeline
    (one row each, stage order); None on the other ranks. Every rank creates every group (new_group is
    collective), in the same order."""
    mine = None
    for row in pipelines.tolist():
        group = dist.new_group([row[0], row[-1]])
        if dist.get_rank() in (row[0], row[-1]):
            mine = group
    return mine


def __getattr__(name: str) -> Any:
    # `PipelineStrategy` is `ParallelStrategy`'s one-dimension form and lives beside it (parallel.py imports this
    # module); its old address, `lightning_llm.strategies.pipeline.PipelineStrategy`, in YAML configs and imports,
    # still resolves.
    if name == "PipelineStrategy":
        from lightning_llm.strategies.parallel import PipelineStrategy

        return PipelineStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
