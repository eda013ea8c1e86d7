"""FlashAttention as a transformers attention implementation: `attn_implementation="lightning_fa2"`.

transformers looks attention functions up by name in `AttentionInterface`, and asks
`AttentionMaskInterface` under the same name how to build the mask: a name missing there gets no mask at
all, so padding would be silently ignored. This module registers both: `valid_keys_mask` (None for a batch
without padding whose keys are all real, else the 2-d [batch, valid_len] mask of the real keys) and
`lightning_attention_forward`, which turns whatever describes the sequences into one kernel call:

- a padding mask: the padded tokens are dropped and the rest run as packed variable-length sequences; keys
  past the mask's length are a StaticCache's empty slots and are cut off;
- `cu_seq_lens_q`/`cu_seq_lens_k` (transformers' padding-free collators): used as they are;
- position_ids that restart inside a row (packed examples, as the instruction-tuning packer makes them):
  each run of positions becomes one sequence, so packed examples never attend to each other;
- otherwise: dense attention, causal with the last query aligned to the last key (KV-cache decoding).

The name holds no "flash": transformers takes any implementation name containing "flash" for a
flash-attn build to import from the hub.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from lightning_llm.attention.flash import (
    SDPA,
    as_tokens,
    attention_backend,
    cu_seqlens_of,
    flash_attention,
    packed_cu_seqlens,
)

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "lightning_fa2"

# Arguments by which a model changes its attention scores beyond q k^T * scaling and the mask, as transformers'
# decoders pass them to the attention function: learned attention sinks (GPT-OSS `s_aux`, `sinks`), an additive
# score bias (`position_bias`), sparse attention's selected keys (DeepSeek's `indices`, `block_indices`). The
# kernel computes none of them, and an argument left unread would give other attention without a word.
SCORE_MODIFIERS = ("s_aux", "sinks", "position_bias", "indices", "block_indices")


def valid_keys_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int | Tensor = 0,
                    kv_offset: int = 0, attention_mask: Tensor | None = None, device: torch.device | str = "cpu",
                    **kwargs) -> Tensor | None:
    """transformers' flash-attention mask, plus the valid length of a preallocated cache.

    A StaticCache hands attention its whole buffer (kv_length = max_cache_len slots) while only the first
    q_offset + q_length slots hold tokens. transformers' own flash-attention path learns the valid length
    from the padding mask's length and slices K/V to it, so without a mask it would attend over the whole
    buffer; here the cache's count (q_offset) makes the mask whenever slots are empty, so a call without a
    mask is right too. (int(q_offset) reads a StaticCache's tensor counter: one host sync per forward.)
    """
    mask = flash_attention_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                                attention_mask=attention_mask, **kwargs)
    valid_length = int(q_offset) + q_length - kv_offset
    if mask is None and valid_length < kv_length:
        mask = torch.ones(batch_size, valid_length, dtype=torch.bool, device=device)
    return mask


# Which sequences a call holds is read from the data (a padding mask's valid rows, position-id restarts turned
# into cu_seqlens by nonzero, host syncs in the kernel's dispatch): traced by torch.compile it would split the
# compiled decoder block into pieces and recompile for every batch's document boundaries. Under compile it runs
# as one eager call between the block's compiled halves, whose shapes the block size fixes.
@torch.compiler.disable
def lightning_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_ids: Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature: query [B, H, Tq, D], key/value [B, H_kv, Tk, D]
    (unrepeated); returns ([B, Tq, H, D], None). Sets `module.attention_backend` to the path that ran."""
    if dropout:
        raise ValueError(f"{ATTN_IMPLEMENTATION} has no attention dropout (got {dropout}): set the model "
                         "config's attention_dropout to 0.0")
    refuse_score_changes(module, softcap, kwargs)
    causal = module.is_causal if is_causal is None else is_causal
    batch, num_heads, seqlen_q, head_dim = query.shape
    seqlen_k = key.shape[2]
    window = partial(check_window_unreached, sliding_window, causal)
    module.attention_backend = attention_backend(query.device)

    if attention_mask is not None and attention_mask.dim() == 4:
        # A caller-made 4-d mask can say anything; only materialised-mask attention can honour it.
        log.debug("%s: a 4-d attention mask was given, running transformers' sdpa attention", ATTN_IMPLEMENTATION)
        module.attention_backend = SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)

    options = dict(causal=causal, scale=scaling)
    if attention_mask is not None:
        if attention_mask.shape[0] != batch or not seqlen_q <= attention_mask.shape[1] <= seqlen_k:
            raise ValueError(f"padding mask of shape {tuple(attention_mask.shape)} does not match queries and keys "
                             f"[batch={batch}, q_len={seqlen_q}, kv_len={seqlen_k}]: expected [{batch}, "
                             f"valid_len] with {seqlen_q} <= valid_len <= {seqlen_k}")
        window(attention_mask.shape[1])  # (the real tokens lie within the mask's length)
        # A mask shorter than the keys: a StaticCache's buffer, whose slots past the mask are empty.
        key, value = key[:, :, :attention_mask.shape[1]], value[:, :, :attention_mask.shape[1]]
        # Queries are the last seqlen_q positions of the mask (all of it without a KV cache).
        mask_q, mask_k = attention_mask[:, -seqlen_q:], attention_mask
        q_tokens = query.transpose(1, 2)[mask_q]
        k_tokens, v_tokens = key.transpose(1, 2)[mask_k], value.transpose(1, 2)[mask_k]
        out_tokens = flash_attention(q_tokens, k_tokens, v_tokens, cu_seqlens=cu_seqlens_of(mask_q.sum(1)),
                                     cu_seqlens_k=cu_seqlens_of(mask_k.sum(1)), **options)
        # Padded queries attend to nothing: they get 0, like transformers' own flash-attention path.
        out = query.new_zeros(batch, seqlen_q, num_heads, head_dim)
        return out.index_put((mask_q,), out_tokens), None

    cu_seqlens = kwargs.get("cu_seq_lens_q")
    packing = dict(cu_seqlens_k=kwargs.get("cu_seq_lens_k"), max_seqlen=kwargs.get("max_length_q"),
                   max_seqlen_k=kwargs.get("max_length_k"))
    if cu_seqlens is None and position_ids is not None and seqlen_q == seqlen_k:
        cu_seqlens, packing = packed_cu_seqlens(position_ids, batch), {}
    if cu_seqlens is not None:
        keys = packing["cu_seqlens_k"] if packing.get("cu_seqlens_k") is not None else cu_seqlens
        window(int(keys.diff().max()))
        out = flash_attention(as_tokens(query), as_tokens(key), as_tokens(value), cu_seqlens=cu_seqlens, **packing,
                              **options)
        return out.reshape(batch, seqlen_q, num_heads, head_dim), None

    window(seqlen_k)
    return flash_attention(query, key, value, **options).transpose(1, 2), None


def refuse_score_changes(module: nn.Module, softcap: float | None, kwargs: dict) -> None:
    """Refuse logit soft-capping and the `SCORE_MODIFIERS` an attention call was given: the kernel (and ring and
    all-to-all attention, built on it) computes softmax(q k^T * scaling) v under a causal or padding mask only."""
    if softcap is not None:
        raise ValueError(f"{ATTN_IMPLEMENTATION} has no logit soft-capping (got softcap={softcap}): use "
                         "attn_implementation='eager' for this model (sdpa has none either)")
    modifiers = [name for name in SCORE_MODIFIERS if kwargs.get(name) is not None]
    if modifiers:
        raise ValueError(f"{ATTN_IMPLEMENTATION} computes softmax(q k^T * scaling) v under a causal or padding mask "
                         f"only, and {type(module).__name__} also passes {', '.join(modifiers)} (attention sinks, a "
                         "score bias or sparse key selection): use the model's own attention, attn_implementation="
                         "'eager' (or another the model supports)")


def check_window_unreached(sliding_window: int | None, causal: bool, longest: int) -> None:
    """Refuse a sliding window that this call's sequences (the longest holding `longest` keys) would reach.

    The kernel has no sliding window. transformers' lets a query at position i see the key at j when
    i - j < sliding_window, so causal attention over at most sliding_window keys never reaches past it and is
    the windowed attention exactly: a model with a window (Mistral, Phi-3, Gemma's local layers) runs until a
    sequence outgrows it, and is refused from there.
    """
    if sliding_window is None or (causal and longest <= sliding_window):
        return
    held = f"a sequence of {longest} keys" if causal else "non-causal attention"
    raise ValueError(f"{ATTN_IMPLEMENTATION} has no sliding window: it runs a model with sliding_window={sliding_window} "
                     f"only on causal sequences of at most {sliding_window} tokens (cache included), and this call has "
                     f"{held}: use attn_implementation='sdpa' (or 'eager') for this model")


def unsupported_reason(config: PretrainedConfig) -> str | None:
    """Why a model with `config` cannot run on `lightning_fa2` (what `lightning_attention_forward` refuses:
    attention dropout, sliding windows, logit soft-capping), or None when it can. Conservative: a sliding
    window counts even where it is unused, or where every sequence would stay within it (which runs)."""
    if getattr(config, "attention_dropout", 0.0):
        return f"attention_dropout={config.attention_dropout}"
    if getattr(config, "sliding_window", None) is not None:
        return f"sliding_window={config.sliding_window}"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return f"attn_logit_softcapping={config.attn_logit_softcapping}"
    return None


def register() -> None:
    """Make `attn_implementation="lightning_fa2"` known to every transformers model (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, lightning_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, valid_keys_mask)
