"""Compile a causal LM one decoder block at a time with `torch.compile`, as torchtitan does.

Why per block rather than the whole model:
- compile time is that of one block: every block runs the same code, so dynamo traces the first
  one and the others reuse its graph (their weights are graph inputs, not constants);
- the glue between blocks stays eager: the embedding, the LM head and, above all, transformers'
  mask building, which reads the position ids to find the documents of a packed block. Each block
  gets the finished mask, whose shape (batch, 1, block, block) the block size fixes, so document
  boundaries change only its values and never recompile. (A batch of another size, e.g. a last
  short one, makes dynamo mark the batch dimension dynamic: one more compile, then none.)
- it is `forward` that is compiled, not the module, so module hooks stay outside the compiled
  region: ZeRO's `fully_shard` all-gathers and activation checkpointing wrap the compiled forward
  exactly as they wrap the eager one, and the pipeline's stages call the same blocks.

The training loss (cross-entropy of the full logits) is compiled too, by the module (`compiled_while_training`):
inductor fuses the log-softmax, the gather and their backward into a few passes over the logits, which on a
small model are a large share of the step (litgpt gains the same by compiling its whole model).

Only a block in training mode runs compiled; evaluation, validation and generation run it eagerly,
since generation's growing KV cache would give every length its own compile.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

CompileOption = bool | dict[str, Any]


def compile_options(option: CompileOption) -> dict[str, Any] | None:
    """`torch.compile` keyword arguments for a module's `compile` option (None: do not compile).

    `True` is torch.compile's defaults (inductor); a dict is passed as is ({"mode": "max-autotune"},
    {"backend": "aot_eager"}); its keys are checked against torch.compile's here, at construction.
    """
    if option is False:
        return None
    if option is True:
        return {}
    if not isinstance(option, dict):
        raise ValueError(f"compile={option!r}: give true, false or a dict of torch.compile options")
    accepted = set(inspect.signature(torch.compile).parameters) - {"model"}
    unknown = sorted(set(option) - accepted)
    if unknown:
        raise ValueError(f"compile={option!r}: unknown torch.compile option(s) {unknown}; accepted: {sorted(accepted)}")
    return dict(option)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of the Hugging Face models inside `model` (their `_no_split_modules` classes)."""
    names = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_blocks(model: nn.Module, **options: Any) -> int:
    """Compile the forward of every decoder block of `model` with `torch.compile(**options)`; returns the count.

    Raises ValueError for a model without Hugging Face decoder blocks (nothing to compile per block).
    """
    blocks = decoder_blocks(model)
    if not blocks:
        raise ValueError(f"compile: {type(model).__name__} has no Hugging Face decoder blocks (`_no_split_modules`) "
                         "to compile one at a time")
    for block in blocks:
        _compile_forward(block, options)
    return len(blocks)


def _compile_forward(block: nn.Module, options: dict[str, Any]) -> None:
    block.forward = compiled_while_training(block.forward, block, options)


def compiled_while_training(fn: Callable[..., Any], owner: nn.Module, options: dict[str, Any]) -> Callable[..., Any]:
    """`fn`, compiled with `torch.compile(**options)`, while `owner` is in training mode; eager otherwise."""
    compiled = torch.compile(fn, **options)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        return (compiled if owner.training else fn)(*args, **kwargs)

    return call
