"""PretrainModule: next-token prediction on packed blocks with a Hugging Face causal LM.

The module owns the objective, the optimizer and its schedule, and the metrics; the model is a
transformers causal LM built in `configure_model`, so a sharding strategy can create it on the meta
device and materialise only its shard. The instruction-tuning module subclasses this one.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.plugins.precision import MixedPrecision as LightningAMP
from torch.optim.lr_scheduler import LambdaLR
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
from torchmetrics import MeanMetric
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from lightning_llm.checkpoint import use_atomic_checkpoint_io
from lightning_llm.chunked_loss import final_hidden_states, linear_cross_entropy_sum, output_head
from lightning_llm.compile import CompileOption, compile_blocks, compile_options, compiled_while_training
from lightning_llm.data.pretrain import check_block_fits
from lightning_llm.data.tokenizer import load_tokenizer
from lightning_llm.divergence import DivergenceGuard
from lightning_llm.models import build_config, build_model, has_weights
from lightning_llm.moe import check_capacity_factor, dispatches, use_capacity
from lightning_llm.modules.router import expert_token_counts, load_balancing_loss, router_z_loss
from lightning_llm.protocols import gradient_replicas, local_loss
from lightning_llm.scaling import moe_shape


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over target tokens (-100 = ignored), computed in fp32 (logits may be vocabulary-parallel)."""
    return local_loss(F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=-100))


def next_token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over target tokens (-100 = ignored), computed in fp32 (logits may be vocabulary-parallel)."""
    return local_loss(F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=-100, reduction="sum"))


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to `min_lr_ratio` at `max_steps`.

    Why not transformers' `get_cosine_with_min_lr_schedule_with_warmup`: from the end of warmup to
    `max_steps` it is this schedule, value for value, but its warmup starts at 0 (step s gets s/warmup,
    so the first optimizer step is taken at learning rate 0; here it is (s+1)/warmup), and after
    `num_training_steps` its cosine rises again where this one stays at the floor (a run may train past
    the `max_steps` of its schedule). tests/test_schedule.py holds the two side by side.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices; none on norms, biases and embeddings (tied or not)."""
    no_decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or id(p) in no_decay_ids else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, bytes]:
    """The tokenizer's `save_pretrained` files, so a checkpoint carries its tokenizer."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


# The files by which a model directory carries its tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def directory_tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer a model directory carries (an export's), None where it has none."""
    return load_tokenizer(path) if any((path / name).exists() for name in TOKENIZER_FILES) else None


def check_same_vocabulary(model_tokenizer: PreTrainedTokenizerBase, data_tokenizer: PreTrainedTokenizerBase, model: str) -> None:
    """Raise unless the data's tokenizer gives every token of the tokenizer the model was trained with the
    same id (it may add tokens: a chat template's role tokens). Weights trained with one vocabulary and
    fed another's ids learn from text they cannot read."""
    if data_tokenizer is model_tokenizer:
        return
    data_vocab = data_tokenizer.get_vocab()
    differ = [(token, i) for token, i in model_tokenizer.get_vocab().items() if data_vocab.get(token) != i]
    if differ:
        token, i = min(differ, key=lambda item: item[1])
        raise ValueError(
            f"the data module's tokenizer is not the one the weights of {model!r} were trained with: {len(differ)} of its "
            f"{len(model_tokenizer)} tokens have another id or none there (e.g. {token!r}: {i} in the model's, "
            f"{data_vocab.get(token)} in the data's). Tokenize the data with the model's tokenizer: give the data module "
            f"tokenizer={model!r} (instruction data: leave its tokenizer unset)")


class PretrainModule(LightningModule):
    """Next-token pretraining of a causal LM.

    Args:
        model: a preset name, a config file, a local model directory or a hub id (see `models.build_model`).
        vocab_size: the model's vocabulary; `None` takes the data module's tokenizer size (or the preset's).
        attn_implementation: an entry of transformers' attention registry ("sdpa", "eager", "lightning_fa2").
        lr: peak learning rate of AdamW.
        weight_decay: decoupled weight decay on weight matrices (none on norms, biases, embeddings).
        betas: AdamW betas.
        warmup_steps: linear warmup steps.
        min_lr_ratio: the cosine schedule ends at `lr * min_lr_ratio`.
        max_steps: length of the cosine schedule; `None` takes the trainer's estimated optimizer steps.
        activation_checkpointing: recompute each decoder layer's activations in the backward pass.
        compile: `torch.compile` each decoder block's forward while training (`lightning_llm.compile`);
            true for torch's defaults, or a dict of torch.compile options ({"mode": "max-autotune"}).
        on_nonfinite: what a non-finite loss or gradient norm does (`DivergenceGuard`, which the module
            adds to the trainer and which also logs the gradient norm): "stop" the run with an error
            before the step is applied, or "skip" the step.
        max_nonfinite_skips: with on_nonfinite="skip", stop after this many skipped steps in a row.
        router_aux_loss_coef: weight of the load-balancing loss of a mixture-of-experts model
            (`modules.router.load_balancing_loss`, 1.0 when balanced); ignored by a dense model.
        router_z_loss_coef: weight of the router z-loss (`modules.router.router_z_loss`).
        capacity_factor: a mixture of experts' expert capacity, as a multiple of its even share of a
            rank's (token, expert) pairs; the pairs past it are dropped (`lightning_llm.moe`) and the
            dropped fraction is logged. None: dropless, every pair computed.
        loss_chunk_size: compute the output projection and the loss this many tokens at a time, never
            holding the full logits (`chunked_loss`); 0 or None computes the model's logits whole.
            Refused, before training, where the loss is not computed here from the head (a pipeline,
            a tensor-parallel head, a mixture-of-experts model).
    """

    # Its steps use the logits only through next_token_loss(_sum): a `VocabParallelLoss` (lightning_llm.protocols).
    vocab_parallel_loss = True

    def __init__(
        self,
        model: str = "tiny",
        *,
        vocab_size: int | None = None,
        attn_implementation: str | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
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
        super().__init__()
        self._compile_options = compile_options(compile)  # validates it
        if not (router_aux_loss_coef >= 0 and router_z_loss_coef >= 0):
            raise ValueError(f"router_aux_loss_coef and router_z_loss_coef must be >= 0 (0 turns a term off), "
                             f"got {router_aux_loss_coef}, {router_z_loss_coef}")
        check_capacity_factor(capacity_factor)
        if loss_chunk_size is not None and (isinstance(loss_chunk_size, bool) or loss_chunk_size < 0):
            raise ValueError(f"loss_chunk_size must be a number of tokens >= 1, or 0/None for the plain loss; got {loss_chunk_size!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if warmup_steps < 0 or not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"warmup_steps must be >= 0 and min_lr_ratio in [0, 1], got {warmup_steps}, {min_lr_ratio}")
        self.save_hyperparameters()
        self.divergence_guard = DivergenceGuard(on_nonfinite, max_nonfinite_skips)  # validates both
        self.model: PreTrainedModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.val_loss = MeanMetric()
        self.val_history: list[tuple[int, float]] = []
        self.tokens_seen = 0
        self._token_loss_sum = next_token_loss_sum  # compiled in configure_model under `compile`

    # -- model -----------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if self._trainer is not None:
            use_atomic_checkpoint_io(self.trainer)  # Lightning's default writes through $TMPDIR
        # The data was tokenized with the data module's tokenizer: the model and the checkpoints use that one.
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and getattr(datamodule, "tokenizer", None) is not None:
            own = self.pretrained_tokenizer()
            if own is not None:
                check_same_vocabulary(own, datamodule.tokenizer, str(self.hparams.model))
            self.tokenizer = datamodule.tokenizer

    def pretrained_tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The tokenizer that the model's pretrained weights were trained with: a local model directory's
        (an export's); None for a fresh model, or weights that come without one."""
        spec = self.hparams.model
        if not isinstance(spec, str | os.PathLike) or not Path(spec).is_dir() or not has_weights(spec):
            return None
        return directory_tokenizer(Path(spec))

    def configure_model(self) -> None:
        if self.model is not None:
            return
        # Callbacks may ask for load options (QLoRA: straight to 4 bits, never the whole model in 16/32).
        load_kwargs: dict[str, Any] = {}
        for callback in self.trainer.callbacks if self._trainer is not None else []:
            hook = getattr(callback, "model_load_kwargs", None)
            if hook is not None:
                load_kwargs.update(hook(self))
        # `from_pretrained` returns a model in eval mode; training starts from train mode (dropout).
        self.model = self.build_hf_model(**load_kwargs).train()
        self._check_data_fits()
        if self.hparams.capacity_factor is not None:
            if moe_shape(self.model.config) is None:
                raise ValueError(f"capacity_factor={self.hparams.capacity_factor} applies to a mixture-of-experts "
                                 f"model; {self.hparams.model!r} is dense: leave capacity_factor=None")
            use_capacity(self.model, self.hparams.capacity_factor)
        # Callbacks that change the model (LoRA, QLoRA) do it here: after it is built, before a
        # strategy shards it and before the optimizer sees its parameters.
        for callback in self.trainer.callbacks if self._trainer is not None else []:
            transform = getattr(callback, "transform_model", None)
            if transform is not None:
                self.model = transform(self.model, self)
        if self.hparams.loss_chunk_size:
            self._check_chunked_loss_applies()
        if self.hparams.activation_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self._compile_options is not None:
            compile_blocks(self.model, **self._compile_options)
            strategy = self.trainer.strategy if self._trainer is not None else None
            if getattr(strategy, "tensor_parallel", 1) == 1:  # (vocabulary-parallel logits stay eager: loss_parallel)
                self._token_loss_sum = compiled_while_training(next_token_loss_sum, self, self._compile_options)

    def _check_chunked_loss_applies(self) -> None:
        """Refuse `loss_chunk_size` before training where this module does not compute the loss from the
        output head itself, rather than ignore it."""
        chunk = self.hparams.loss_chunk_size
        strategy = self.trainer.strategy if self._trainer is not None else None
        where = None
        if moe_shape(self.model.config) is not None:
            where = "a mixture-of-experts model (its router terms come with the whole logits)"
        elif getattr(strategy, "pipeline_parallel", 1) > 1:
            where = f"{type(strategy).__name__} (the last stage computes the loss from its logits)"
        elif getattr(strategy, "tensor_parallel", 1) > 1:
            where = f"{type(strategy).__name__}(tensor_parallel={strategy.tensor_parallel}) (the head is split over the vocabulary)"
        if where is not None:
            raise ValueError(f"loss_chunk_size={chunk} is not supported under {where}; set loss_chunk_size=0")
        output_head(self.model)  # refuses a head the fused loss cannot compute (LoRA, quantised, soft-capped)

    def build_hf_model(self, **load_kwargs: Any) -> PreTrainedModel:
        """The HF model named by `model`; subclasses that start from elsewhere (a checkpoint) override this.

        `load_kwargs` go to `from_pretrained` when the model has pretrained weights (a random
        initialisation has nothing to load and ignores them)."""
        hp = self.hparams
        if has_weights(hp.model):  # pretrained weights keep their own vocabulary
            return build_model(hp.model, attn_implementation=hp.attn_implementation, **load_kwargs)
        # A randomly initialised model takes the tokenizer's vocabulary.
        vocab_size = hp.vocab_size or (len(self.tokenizer) if self.tokenizer is not None else None)
        overrides = {} if vocab_size is None else {"vocab_size": vocab_size}
        return build_model(hp.model, attn_implementation=hp.attn_implementation, **overrides)

    def context_window(self) -> int | None:
        """The longest sequence the model takes, known before it is built (a data module checks its
        block against it before tokenizing); an unknown model name is an error here, as early."""
        config = self.model.config if self.model is not None else self.model_config()
        return getattr(config, "max_position_embeddings", None) if config is not None else None

    def model_config(self) -> PretrainedConfig | None:
        """The config of the model `configure_model` will build; subclasses return None where only building tells."""
        return build_config(self.hparams.model)

    def _check_data_fits(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        block_size = getattr(datamodule, "block_size", None)
        if block_size is not None:
            check_block_fits(block_size, getattr(self.model.config, "max_position_embeddings", None))
        if self.tokenizer is not None and len(self.tokenizer) > self.model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary is "
                f"{self.model.config.vocab_size}: token ids would index past the embedding"
            )

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> torch.Tensor:
        """The logits; given `targets`, the summed next-token loss instead: the module's one loss.

        With `loss_chunk_size` the loss comes from the final hidden states through the fused chunked
        head, and the full logits never exist. (Inside `forward`, so that a sharding strategy's gather of
        the outer parameters, the output projection's among them, is in effect.)
        """
        inputs = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False)
        chunk_size = self.hparams.loss_chunk_size
        if targets is None or not chunk_size:
            logits = self.model(**inputs).logits
            return logits if targets is None else self.loss_sum(logits, targets)
        head = output_head(self.model)
        return linear_cross_entropy_sum(final_hidden_states(self.model, **inputs), head.weight, targets, head.bias,
                                        chunk_size=chunk_size)

    def loss_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The module's loss, summed over the target tokens: what every layout trains on (a pipeline's last
        stage calls it per micro-batch, see `lightning_llm.protocols.PipelinedTraining`); compiled under `compile`."""
        return self._token_loss_sum(logits, targets)

    def router_loss(self, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The mixture of experts' router terms added to the training loss; logs them and the expert loads.

        Each rank balances its own tokens (data-parallel ranks average the gradients, so the mean of
        the ranks' terms); the logged token counts per layer and expert are summed over the ranks.
        """
        hp = self.hparams
        top_k = moe_shape(self.model.config)[1]
        mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None  # 2-D: 0 = padding
        aux, z = load_balancing_loss(router_logits, top_k, mask), router_z_loss(router_logits, mask)
        counts = expert_token_counts(router_logits, top_k, mask).float()
        if self._data_parallel_size() > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        self.log("train/router_aux_loss", aux.detach())
        self.log("train/router_z_loss", z.detach())
        if hp.capacity_factor is not None:
            dropped = torch.stack([d.dropped_fraction for d in dispatches(self.model)]).mean().to(counts.device)
            self.log("train/dropped_fraction", self.trainer.strategy.reduce(dropped) if self._data_parallel_size() > 1 else dropped)
        for layer, row in enumerate(counts):
            for expert, count in enumerate(row):
                self.log(f"train/expert_tokens/layer{layer}/expert{expert}", count)
        return hp.router_aux_loss_coef * aux + hp.router_z_loss_coef * z

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over the batch's target tokens (-100 = ignored)."""
        total = self(batch["input_ids"], batch.get("position_ids"), batch.get("attention_mask"), batch["targets"])
        return total / (batch["targets"] != -100).sum().clamp(min=1)

    # -- steps -----------------------------------------------------------------------------------

    def _data_parallel_size(self) -> int:
        return gradient_replicas(self.trainer.strategy)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss this rank backpropagates, and the global batch's token-mean loss (for the logs).

        Data-parallel ranks can hold different numbers of target tokens (instruction data: answers
        vary in length). A per-rank mean, averaged over ranks, would weight a token on a rank with
        few of them more than one on a busy rank. Each rank instead divides its summed loss by the
        mean count over ranks, so the ranks' averaged gradients are those of the token mean over
        the whole global batch, as one process computes it. (Within gradient accumulation each
        micro-batch is still its own mean.)
        """
        moe = moe_shape(self.model.config) is not None
        if moe:  # the router logits come with the model's outputs (configure_model refuses a chunked loss here)
            outputs = self.model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"),
                                 attention_mask=batch.get("attention_mask"), use_cache=False, output_router_logits=True)
            total = self.loss_sum(outputs.logits, batch["targets"])
        else:
            total = self(batch["input_ids"], batch.get("position_ids"), batch.get("attention_mask"), batch["targets"])
        totals = torch.stack([total.detach(), (batch["targets"] != -100).sum().to(total.dtype)])
        replicas = self._data_parallel_size()
        if replicas > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        tokens = totals[1].clamp(min=1)
        loss = total * replicas / tokens
        if moe:  # the router terms, on top of the token loss (which `batch_loss` alone reports)
            loss = loss + self.router_loss(outputs.router_logits, batch.get("attention_mask"))
        return loss, totals[0] / tokens

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, batch_loss = self.training_loss(batch)
        self.log_training_step(batch, batch_loss)
        return loss

    def log_training_step(self, batch: Mapping[str, torch.Tensor], loss: torch.Tensor) -> None:
        """Count the step's tokens and log its metrics; `loss`: the global batch's token-mean loss. (Called by
        `training_step`, and by a pipeline strategy that ran the step: `lightning_llm.protocols.PipelinedTraining`.)"""
        self.tokens_seen += self._global_tokens(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", torch.exp(loss.clamp(max=20)))
        self.log("train/tokens", float(self.tokens_seen))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    def _global_tokens(self, batch: Mapping[str, torch.Tensor]) -> int:
        """The step's tokens over the data-parallel replicas, padding left out: each row's `num_tokens` (instruction
        data) or its 2-D attention mask's ones where the batch has them, else every position of `input_ids`.

        Counts that tell padding apart can differ between replicas, so they are summed over the ranks of
        `strategy.reduce`, the gradient replicas. Context-parallel ranks of one replica hold the same rows, each
        with a share of their positions and all of their `num_tokens`: the sum counts each row once per such
        rank, hence the division by the ranks per replica (gradient replicas / the sampler's replicas)."""
        replicas = self._data_parallel_size()
        mask = batch.get("attention_mask")
        if "num_tokens" in batch:
            local = batch["num_tokens"].sum()
        elif mask is not None and mask.dim() == 2:
            local = mask.sum()
        else:
            return batch["input_ids"].numel() * replicas
        if replicas == 1:
            return int(local)
        total = int(self.trainer.strategy.reduce(local.to(torch.int64), reduce_op="sum"))
        samplers = (getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}).get("num_replicas", replicas)
        return total * samplers // replicas

    def configure_callbacks(self) -> list[Callback]:
        return [self.divergence_guard]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self.loss(batch)
        self.val_loss.update(loss, weight=(batch["targets"] != -100).sum())

    def on_validation_epoch_end(self) -> None:
        value = self.val_loss.compute()
        self.val_loss.reset()
        self.val_history.append((self.global_step, value.item()))
        if not self.trainer.sanity_checking:
            # `compute` already reduced over the ranks' tokens, so the value is equal on every rank and the
            # mean over ranks that sync_dist takes is that value; without it Lightning warns, in every
            # distributed run, that an epoch-level value may differ between ranks.
            self.log("val/loss", value, prog_bar=True, sync_dist=True)
            self.log("val/ppl", torch.exp(value.clamp(max=20)), sync_dist=True)
        rank_zero_info(f"validation loss at step {self.global_step}: {value.item():.4f}")

    def on_fit_end(self) -> None:
        if len(self.val_history) >= 2:
            (s0, first), (s1, last) = self.val_history[0], self.val_history[-1]
            rank_zero_info(f"validation loss: {first:.4f} at step {s0} -> {last:.4f} at step {s1}")

    # -- optimizer -------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = parameter_groups(self, hp.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), fused=self._fused_step(groups))
        max_steps = hp.max_steps or int(self.trainer.estimated_stepping_batches)
        schedule = LambdaLR(optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, max_steps, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _fused_step(self, groups: list[dict[str, Any]]) -> bool:
        """Whether AdamW steps with torch's fused kernel (on a CPU ~5x faster than its default loop over tensors,
        llama-5m): where torch has one for every parameter's device and dtype, and no loss scaler runs (a scaler
        unscales, checks and clips the gradients before the step; a fused step would unscale inside it), nor
        under Lightning's own AMP plugin ("bf16-mixed"/"16-mixed" strings), which refuses to clip the gradients
        of any optimizer that might unscale them itself, fused ones included, even where no scaler runs."""
        if self._trainer is not None:
            plugin = self.trainer.precision_plugin
            if getattr(plugin, "scaler", None) is not None or isinstance(plugin, LightningAMP):
                return False
        devices = _get_fused_kernels_supported_devices()
        return all(p.device.type in devices and p.is_floating_point() for group in groups for p in group["params"])

    # A resumed run restores the optimizer's and the schedule's state, and with it the checkpoint's peak
    # learning rate, betas and weight decay. This run's options win (the user may lower the rate on
    # resume): they are noted once the optimizer is final (after the callbacks' on_fit_start, which may
    # scale rates or swap the optimizer; before the checkpoint is loaded), put back after the load, and
    # the schedule continues from its step on the peak rate of this run.

    def on_fit_start(self) -> None:
        self._group_options = [[{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
                               for optimizer in self.trainer.optimizers]

    def on_train_start(self) -> None:
        if self.trainer.ckpt_path is None:
            return
        for optimizer, options in zip(self.trainer.optimizers, self._group_options, strict=True):
            for group, own in zip(optimizer.param_groups, options, strict=True):
                group.update(own)
        for config in self.trainer.lr_scheduler_configs:
            schedule = config.scheduler
            while not isinstance(schedule, LambdaLR) and hasattr(schedule, "scheduler"):  # wrappers (HoldOnSkippedStep)
                schedule = schedule.scheduler
            if isinstance(schedule, LambdaLR):  # (it set each group's initial_lr, the peak rate)
                groups = schedule.optimizer.param_groups
                schedule.base_lrs = [group["initial_lr"] for group in groups]
                for group, factor in zip(groups, schedule.lr_lambdas, strict=True):
                    group["lr"] = group["initial_lr"] * factor(schedule.last_epoch)

    # -- checkpoints -----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The config and tokenizer travel with the weights, so `generate` and `export` need nothing else.
        checkpoint["hf_config"] = self.model.config.to_dict()
        checkpoint["tokens_seen"] = self.tokens_seen
        checkpoint["val_history"] = self.val_history
        if self.tokenizer is not None:
            checkpoint["tokenizer_files"] = tokenizer_files(self.tokenizer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Before the weights load: callbacks that shaped the model (LoRA's rank) check that the checkpoint
        # fits it, and name the option, where the load would fail on tensor shapes.
        for callback in self.trainer.callbacks if self._trainer is not None else []:
            check = getattr(callback, "check_checkpoint", None)
            if check is not None:
                check(checkpoint)
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
        self.val_history = list(checkpoint.get("val_history", []))
