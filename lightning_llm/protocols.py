"""The typed hooks between modules, callbacks and strategies.

A strategy never imports a module (DESIGN: strategies work for any LightningModule), so what it may
ask of one is written down here, where both sides import it from.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class VocabParallelLoss(Protocol):
    """A LightningModule whose training and validation steps take vocabulary-parallel logits.

    Under tensor parallelism the LM head's output is split over the vocabulary: each rank of a
    tensor-parallel group holds its own slice of every token's logits, as a `DTensor` sharded on the
    last dimension. A module with `vocab_parallel_loss = True` promises that, in its training and
    validation steps, it uses the logits only through `torch.nn.functional.cross_entropy` and turns
    each loss into a plain tensor with `local_loss`; the strategy runs those steps (and backward) under
    torch's `loss_parallel`, so the cross-entropy is computed from the slices and the full logits
    (batch x sequence x vocabulary) never exist on one rank. A module without the attribute gets full
    logits, gathered from the slices (correct, at the cost of that memory and an all-gather).
    """

    vocab_parallel_loss: bool


def gradient_replicas(strategy: object) -> int:
    """How many ranks average their gradients each step, each holding an equal share of the global batch's
    tokens: a strategy's own `gradient_replicas` where it has one (context parallelism: the data-parallel
    replicas times the ranks that split each sequence, whose sampler coordinate is the same), else its
    distributed sampler's `num_replicas` (1 without one). A module scales its token sums by it."""
    replicas = getattr(strategy, "gradient_replicas", None)
    if replicas is None:
        replicas = (getattr(strategy, "distributed_sampler_kwargs", None) or {}).get("num_replicas", 1)
    return replicas


def evaluation_group(strategy: object) -> "torch.distributed.ProcessGroup | None":
    """The process group whose ranks split an evaluation's requests (each scores its share): a strategy's
    own `data_parallel_group` where it has one, else None (all ranks). Under tensor parallelism the ranks of
    a tensor-parallel group hold slices of one model and must run it on the same inputs, and so must the stages
    of one pipeline, so only the data-parallel ranks may take different requests (see `WholeModelEvaluation`)."""
    return getattr(strategy, "data_parallel_group", None)


@dataclass(frozen=True)
class EvaluationCalls:
    """How an evaluation (lm-eval through `lightning_llm.eval.lm_adapter.LightningLM`) may call a model under a
    strategy, inside the strategy's `evaluating` context (`WholeModelEvaluation`).

    - `kv_cache`: generation may keep a KV cache. False where each call must run the whole sequence (a
      pipeline's forward), so `generate` runs with use_cache=False.
    - `lockstep`: model calls are collectives, so every rank makes as many forward passes and `generate` calls
      as the busiest one (throwaway calls on the others) and generation runs with `synced_gpus`. The adapter
      also turns it on by itself where it sees sharded (DTensor) parameters.
    """

    kv_cache: bool = True
    lockstep: bool = False


@runtime_checkable
class WholeModelEvaluation(Protocol):
    """A strategy that says how to evaluate the module's model, which may not be whole on this rank.

    `evaluating(model)` is a context manager around an evaluation of `model` (the LightningModule's causal
    LM): while inside, calling `model` (its forward, hence `generate`) computes the whole model's logits on
    every rank whose ranks feed it the same inputs (those outside `evaluation_group`'s split: other stages of
    a pipeline, other slices of a tensor-parallel model), and it yields the `EvaluationCalls` the evaluation
    must keep to. Under a pipeline the forward is redirected through the stages; a strategy whose ranks hold
    the model as one process would call it needs to change nothing.
    """

    def evaluating(self, model: nn.Module) -> AbstractContextManager[EvaluationCalls]: ...


@contextmanager
def whole_model_evaluation(strategy: object, model: nn.Module) -> Iterator[EvaluationCalls]:
    """The strategy's `evaluating(model)` context where it has one (`WholeModelEvaluation`), else one that
    changes nothing and yields the default `EvaluationCalls`."""
    if isinstance(strategy, WholeModelEvaluation):
        with strategy.evaluating(model) as calls:
            yield calls
    else:
        yield EvaluationCalls()


def restore_forward(module: nn.Module, shadowed: object | None) -> None:
    """Undo a temporary `module.forward = ...` (a step or an evaluation run inside a sharded root's forward):
    put back the instance attribute it shadowed, or drop it so that the class's forward is called again."""
    if shadowed is not None:
        module.forward = shadowed
    else:
        module.__dict__.pop("forward", None)


def local_loss(loss: torch.Tensor) -> torch.Tensor:
    """The plain tensor of a loss: a vocabulary-parallel cross-entropy returns a `DTensor` whose value is
    already the whole loss on every rank of the tensor-parallel group (replicated); other losses pass."""
    to_local = getattr(loss, "to_local", None)  # duck-typed: DTensor is imported only where it exists
    return to_local() if to_local is not None else loss


@runtime_checkable
class PipelinedTraining(Protocol):
    """A LightningModule whose training step a pipeline can run for it.

    Under pipeline parallelism no rank holds the whole model, so the module's `training_step` cannot run:
    the strategy streams the batch through the stages as micro-batches, and the last stage computes the
    loss of each micro-batch from its logits. The module keeps the one definition of that loss, and of
    what is logged about a step, through two methods:

    - `loss_sum(logits, targets)`: the summed loss of one micro-batch over its targets (-100 ignored),
      the same function the module's own `training_step` uses. The strategy divides by the global
      batch's number of targets that are not -100, so the gradients are those of the token-mean loss
      over the whole batch, as one process computes it.
    - `log_training_step(batch, loss)`: log the step's metrics and count what it saw, called on every
      rank after the schedule ran; `batch` is this rank's batch, `loss` the global batch's token-mean
      loss (equal on every rank).
    """

    def loss_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def log_training_step(self, batch: Mapping[str, torch.Tensor], loss: torch.Tensor) -> None: ...
