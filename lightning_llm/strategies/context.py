"""Context parallelism: every sequence split over the ranks of the mesh's context-parallel dimension.

`ParallelStrategy(context_parallel=N)` applies it in three places:

- the model: every Hugging Face model in the LightningModule switches to `attn_implementation=
  "lightning_ring"`, which is ring attention (`attention/ring.py`) over the context-parallel group while a
  training or validation step runs under `sequence_split`, and the project's FlashAttention
  (`lightning_fa2`) otherwise (generation, evaluation: whole sequences on one rank); with
  `context_parallel_mode="all_to_all"`, to "lightning_ulysses" instead: all-to-all attention
  (`attention/ulysses.py`), which shards heads instead of the sequence inside attention;
- the batch: `shard_batch` cuts every [batch, seq] tensor of the step's batch (input ids, next-token targets,
  position ids, made explicit) into the rank's load-balanced chunks, so rotary embeddings see each token's
  true position (in packed rows, its position in its own document) and each target stays with its input
  (targets are already shifted by the data); the model hands the position ids on to attention, where both
  modes keep packed documents apart;
- the loss: ZeRO averages the gradients over data x context parallelism, and the strategy's `reduce` and
  `gradient_replicas` (protocols.py) span the same ranks, so a module's token mean counts every rank's
  tokens and each context-parallel rank's loss is its share of its sequences' token sum.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from lightning_llm.attention.registry import (
    check_window_unreached,
    lightning_attention_forward,
    refuse_score_changes,
    valid_keys_mask,
)
from lightning_llm.attention.ring import check_sequence_length, ring_attention, shard_sequence
from lightning_llm.attention.ulysses import check_heads, ulysses_attention

RING_IMPLEMENTATION = "lightning_ring"
ALL_TO_ALL_IMPLEMENTATION = "lightning_ulysses"

_group: ContextVar[dist.ProcessGroup | None] = ContextVar("context_parallel_group", default=None)


@contextmanager
def sequence_split(group: dist.ProcessGroup) -> Generator[None, None, None]:
    """While inside, "lightning_ring" attention runs ring attention over `group` (the step's batch is sharded)."""
    token = _group.set(group)
    try:
        yield
    finally:
        _group.reset(token)


def ring_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, position_ids: Tensor | None = None,
                           **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' attention-function signature; ring attention inside `sequence_split`, else `lightning_fa2`.
    The position ids (the share `shard_batch` made) tell ring attention where packed documents start."""
    group = _group.get()
    if group is None:
        return lightning_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                           scaling=scaling, is_causal=is_causal, position_ids=position_ids, **kwargs)
    _check_split_inputs(module, attention_mask, dropout, position_ids)
    causal = module.is_causal if is_causal is None else is_causal
    _check_split_scores(module, query, group, causal, kwargs)
    out = ring_attention(query, key, value, group, causal=causal, scale=scaling, position_ids=position_ids)
    return out.transpose(1, 2), None


def all_to_all_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                                 attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                                 is_causal: bool | None = None, position_ids: Tensor | None = None,
                                 **kwargs: Any) -> tuple[Tensor, None]:
    """As `ring_attention_forward`, with all-to-all (Ulysses) attention inside `sequence_split`."""
    group = _group.get()
    if group is None:
        return lightning_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                           scaling=scaling, is_causal=is_causal, position_ids=position_ids, **kwargs)
    _check_split_inputs(module, attention_mask, dropout, position_ids)
    causal = module.is_causal if is_causal is None else is_causal
    _check_split_scores(module, query, group, causal, kwargs)
    out = ulysses_attention(query, key, value, group, causal=causal, scale=scaling, position_ids=position_ids)
    return out.transpose(1, 2), None


def _check_split_inputs(module: nn.Module, attention_mask: Tensor | None, dropout: float,
                        position_ids: Tensor | None) -> None:
    """Refuse what a split sequence cannot honour in either mode: a padding mask, attention dropout, and a call
    without the position ids (which say where packed documents start)."""
    if attention_mask is not None or dropout:
        raise ValueError(f"context parallelism takes unpadded batches without attention dropout, got an attention mask "
                         f"{None if attention_mask is None else tuple(attention_mask.shape)} and dropout {dropout}")
    if position_ids is None:
        # Without them packed documents cannot be told apart: refuse rather than let them see each other.
        raise ValueError(f"context parallelism needs the position ids in attention, but {type(module).__name__} "
                         "called it without them: use a model whose layers pass position_ids on to the attention "
                         "function (transformers' Llama, Qwen, Mistral do)")


def _check_split_scores(module: nn.Module, query: Tensor, group: dist.ProcessGroup, causal: bool,
                        kwargs: dict[str, Any]) -> None:
    """Refuse what ring and all-to-all attention do not compute, as `lightning_fa2` does: soft-capping, attention
    sinks and score biases, and a sliding window that the whole sequence (every rank's share) would reach."""
    refuse_score_changes(module, kwargs.get("softcap"), kwargs)
    if kwargs.get("sliding_window") is not None:
        check_window_unreached(kwargs["sliding_window"], causal, query.shape[2] * dist.get_world_size(group))


def register() -> None:
    """Make `attn_implementation="lightning_ring"` and "lightning_ulysses" known to transformers (idempotent)."""
    AttentionInterface.register(RING_IMPLEMENTATION, ring_attention_forward)
    AttentionMaskInterface.register(RING_IMPLEMENTATION, valid_keys_mask)
    AttentionInterface.register(ALL_TO_ALL_IMPLEMENTATION, all_to_all_attention_forward)
    AttentionMaskInterface.register(ALL_TO_ALL_IMPLEMENTATION, valid_keys_mask)


def use_ring_attention(models: list[nn.Module]) -> None:
    """Switch these Hugging Face models' attention to "lightning_ring"."""
    register()
    for model in models:
        model.set_attn_implementation(RING_IMPLEMENTATION)


def use_all_to_all_attention(models: list[nn.Module], context_parallel: int, tensor_parallel: int = 1) -> None:
    """Switch these Hugging Face models' attention to "lightning_ulysses", refusing at setup a model whose heads
    (those of one tensor-parallel rank) the `context_parallel` ranks cannot share (`check_heads`)."""
    register()
    for model in models:
        heads = model.config.num_attention_heads
        kv_heads = getattr(model.config, "num_key_value_heads", None) or heads
        # Tensor parallelism splits both first; a K/V head it cannot split is replicated, one per rank.
        check_heads(heads // tensor_parallel, max(kv_heads // tensor_parallel, 1), context_parallel)
        model.set_attn_implementation(ALL_TO_ALL_IMPLEMENTATION)


def check_block_size(datamodule: object, world_size: int) -> None:
    """At setup, before any step: a data module's `block_size` (tokens per training sequence), where it has one,
    must cut into 2 x `world_size` equal chunks."""
    block_size = getattr(datamodule, "block_size", None)
    if block_size is not None:
        check_sequence_length(block_size, world_size)


_padded_lengths: set[tuple[int, int]] = set()  # (length, padded length) pairs already reported


def pad_to_chunks(batch: dict[str, Any], chunks: int) -> dict[str, Any]:
    """`batch` right-padded to the next multiple of `chunks` tokens: input ids with 0, `targets` with -100 (no
    loss, no token counted), position ids continuing each row's last one (the padding joins the row's last
    document). Exact for a causal model: no real token attends to a later position, and the padding has no
    targets (the way `pad_collate` pads instruction rows). Any other [batch, seq] entry is refused, naming it:
    what its padding should hold is not known here. Each new (length, padded length) is reported once."""
    rows, seq = batch["input_ids"].shape
    extra = -seq % chunks
    others = sorted(k for k, v in batch.items() if isinstance(v, Tensor) and v.shape[:2] == (rows, seq)
                    and k not in ("input_ids", "targets", "position_ids"))
    if others:
        raise ValueError(f"context parallelism cuts sequences into {chunks} equal chunks; this batch's length {seq} "
                         f"is not a multiple of {chunks}, and it holds {others}, which cannot be padded here: give "
                         f"sequences of a multiple of {chunks} tokens")
    padded = dict(batch)
    padded["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, extra), value=0)
    padded["targets"] = torch.nn.functional.pad(batch["targets"], (0, extra), value=-100)
    if batch.get("position_ids") is not None:
        positions = batch["position_ids"].expand(rows, seq)
        step = torch.arange(1, extra + 1, device=positions.device, dtype=positions.dtype)
        padded["position_ids"] = torch.cat([positions, positions[:, -1:] + step], dim=1)
    if (seq, seq + extra) not in _padded_lengths:
        _padded_lengths.add((seq, seq + extra))
        rank_zero_info(f"context parallelism: batches of {seq} tokens padded on the right to {seq + extra} (a multiple "
                       f"of the {chunks} chunks; the padding has no targets, so the step is the unpadded one's)")
    return padded


def shard_batch(batch: Any, group: dist.ProcessGroup) -> Any:
    """This rank's load-balanced share of every [batch, seq] tensor of a dict batch, position ids added.

    The sequence dimension is the input ids' second one; other entries pass unchanged. Packed rows keep their
    position ids (restarting at each document), so each chunk carries its tokens' positions in their own
    documents. A batch with next-token `targets` whose length does not cut into 2 x N equal chunks is first
    padded on the right to the next length that does (`pad_to_chunks`: exact). Refused, naming the values: a
    batch that is not a dict with `input_ids`, a padding mask, and, without `targets`, such a length.
    """
    if not isinstance(batch, dict) or not isinstance(batch.get("input_ids"), Tensor) or batch["input_ids"].dim() != 2:
        raise ValueError("context parallelism splits dict batches with a [batch, seq] 'input_ids' tensor, got "
                         f"{type(batch).__name__}" + (f" with keys {sorted(batch)}" if isinstance(batch, dict) else ""))
    if "targets" in batch and batch["input_ids"].shape[1] % (2 * dist.get_world_size(group)):
        batch = pad_to_chunks(batch, 2 * dist.get_world_size(group))
    input_ids = batch["input_ids"]
    rows, seq = input_ids.shape
    check_sequence_length(seq, dist.get_world_size(group))
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError("context parallelism does not take padded batches (the attention mask has zeros): pack "
                         "sequences to the full length instead")
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(seq, device=input_ids.device).expand(rows, seq)
    batch = {**batch, "position_ids": positions.expand(rows, seq)}
    batch.pop("attention_mask", None)
    return {key: shard_sequence(value, 1, group) if isinstance(value, Tensor) and value.shape[:2] == (rows, seq)
            else value for key, value in batch.items()}
