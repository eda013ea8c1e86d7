"""InstructionTuningModule: supervised finetuning of a pretrained causal LM on chat-formatted examples.

It is `PretrainModule` (the same next-token loss, optimizer, schedule, logging, checkpoints and
export) started from pretrained weights: an export directory, a hub id or a Lightning checkpoint,
whose tokenizer comes along. The answer-only loss needs nothing here: the data module's targets are
-100 outside the answers, and `PretrainModule.loss` averages over the answer tokens of the batch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from lightning_llm.attention.registry import ATTN_IMPLEMENTATION, unsupported_reason
from lightning_llm.compile import CompileOption
from lightning_llm.data.instruct import Messages, chat_prompt_ids
from lightning_llm.data.tokenizer import load_tokenizer
from lightning_llm.export import load_checkpoint, model_from_checkpoint, tokenizer_from_checkpoint
from lightning_llm.models import has_weights
from lightning_llm.modules.pretrain import PretrainModule, directory_tokenizer

def is_checkpoint(spec: str | os.PathLike) -> bool:
    return str(spec).endswith(".ckpt")


def source_tokenizer(spec: str | os.PathLike) -> PreTrainedTokenizerBase | None:
    """The tokenizer that comes with a model source: a checkpoint's, an export's, a hub id's; None for presets and configs."""
    if is_checkpoint(spec):
        return tokenizer_from_checkpoint(load_checkpoint(spec))
    path = Path(spec)
    if path.is_dir():
        return directory_tokenizer(path)
    return load_tokenizer(spec) if has_weights(spec) else None


def fit_embeddings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Grow the embeddings to the tokenizer when it has tokens the model lacks (a chat template's role tokens).

    New rows are drawn around the mean of the pretrained ones, which keeps the model's output
    distribution nearly unchanged (Hewitt, 2021); a model on the meta device has no mean yet.
    """
    if len(tokenizer) > model.config.vocab_size:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=not model.get_input_embeddings().weight.is_meta)
    return model


def attend_per_example(model: PreTrainedModel) -> None:
    """Packed examples attend each within itself, at the cost of their own lengths: `lightning_fa2` finds
    the examples from the restarting position ids and runs the varlen kernel on CUDA and one SDPA call
    per example on the CPU. transformers' sdpa and eager attention would instead apply a block-diagonal
    mask to the whole block, paying for every pair of tokens across examples only to mask it. A model
    that `lightning_fa2` cannot run (attention dropout, sliding window, soft-capping, or attention that
    does not come from transformers' AttentionInterface) keeps its own."""
    reason = unsupported_reason(model.config)
    if reason is None:
        try:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)  # (only warns where the model cannot switch)
        except ValueError as error:
            reason = str(error)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            reason = reason or f"{type(model).__name__}, whose attention is not set through AttentionInterface"
    if reason is None:
        rank_zero_info(f"packed examples attend per example: attn_implementation={ATTN_IMPLEMENTATION!r} "
                       "(pass attn_implementation to choose another)")
    else:
        rank_zero_info(f"packed examples attend through a block-diagonal mask over the block "
                       f"(attn_implementation={model.config._attn_implementation!r}): {ATTN_IMPLEMENTATION} "
                       f"does not support {reason}")


class InstructionTuningModule(PretrainModule):
    """Supervised finetuning (instruction tuning) of a pretrained causal LM, with the loss on answer tokens only.

    Args:
        model: an export directory, a hub id, a Lightning checkpoint file (`.ckpt`), or (for tests) a
            preset name or config, which starts from random weights.
        attn_implementation: as in `PretrainModule`; `None` with a data module that packs examples
            takes "lightning_fa2" where the model allows it (see `attend_per_example`), else transformers'
            default.
        vocab_size, betas, min_lr_ratio, max_steps, activation_checkpointing, compile, on_nonfinite,
            max_nonfinite_skips, router_aux_loss_coef, router_z_loss_coef, capacity_factor, loss_chunk_size: as
            in `PretrainModule`.
        lr, weight_decay, warmup_steps: as in `PretrainModule`, with finetuning's defaults (a lower
            peak rate, no decay, a short warmup).

    The tokenizer is the model source's; a data module that names another tokenizer overrides it.
    When the chat template adds tokens (the default template's role tokens), the embeddings are
    resized to the tokenizer, new rows drawn around the mean of the pretrained ones.
    """

    def __init__(
        self,
        model: str,
        *,
        vocab_size: int | None = None,
        attn_implementation: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.1,
        max_steps: int | None = None,
        activation_checkpointing: bool = False,
        compile: CompileOption = False,
        on_nonfinite: Literal["stop", "skip"] = "stop",
        max_nonfinite_skips: int = 16,
        router_aux_loss_coef: float = 0.01,
        router_z_loss_coef: float = 0.001,
        capacity_factor: float | None = None,
        loss_chunk_size: int | None = 0,
    ) -> None:
        super().__init__(model, vocab_size=vocab_size, attn_implementation=attn_implementation, lr=lr, weight_decay=weight_decay,
                         betas=betas, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, max_steps=max_steps,
                         activation_checkpointing=activation_checkpointing, compile=compile, on_nonfinite=on_nonfinite,
                         max_nonfinite_skips=max_nonfinite_skips, router_aux_loss_coef=router_aux_loss_coef,
                         router_z_loss_coef=router_z_loss_coef, capacity_factor=capacity_factor,
                         loss_chunk_size=loss_chunk_size)
        if is_checkpoint(model) and not Path(model).is_file():
            raise FileNotFoundError(f"checkpoint {str(model)!r} does not exist")
        self.tokenizer = self.source_tokenizer = source_tokenizer(model)

    def pretrained_tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The model source's tokenizer where it comes with weights (a checkpoint, an export, a hub id)."""
        return self.source_tokenizer if is_checkpoint(self.hparams.model) or has_weights(self.hparams.model) else None

    def model_config(self) -> PretrainedConfig | None:
        if is_checkpoint(self.hparams.model):  # (its config is known once the checkpoint is read, in build_hf_model)
            return None
        return super().model_config()

    def build_hf_model(self, **load_kwargs: Any) -> PreTrainedModel:
        hp = self.hparams
        if is_checkpoint(hp.model):  # (rebuilt from a state dict: there is no `from_pretrained` to pass `load_kwargs` to)
            model = model_from_checkpoint(load_checkpoint(hp.model))
            if hp.attn_implementation is not None:
                model.set_attn_implementation(hp.attn_implementation)
        else:
            model = super().build_hf_model(**load_kwargs)
        if hp.attn_implementation is None and getattr(self._datamodule(), "packing", False):
            attend_per_example(model)
        if self.tokenizer is not None:
            fit_embeddings(model, self.tokenizer)
        return model  # (put in train mode by PretrainModule.configure_model)

    def _datamodule(self) -> object | None:
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def log_training_step(self, batch: Mapping[str, torch.Tensor], loss: torch.Tensor) -> None:
        super().log_training_step(batch, loss)
        if "num_tokens" in batch:
            self.log("train/packing_efficiency", batch["num_tokens"].sum() / batch["input_ids"].numel())


@torch.no_grad()
def generate_answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, messages: Messages, max_new_tokens: int = 64) -> str:
    """The model's greedy answer to `messages`, rendered with the chat template; stops at EOS."""
    ids = torch.tensor([chat_prompt_ids(tokenizer, messages)], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
