"""FlashAttention: the Triton kernel, its readable reference and its registration in transformers.

Importing this package registers `attn_implementation="lightning_fa2"` with transformers.
"""

from lightning_llm.attention.flash import FlashAttention, attention_backend, flash_attention, flash_attention_backward
from lightning_llm.attention.registry import ATTN_IMPLEMENTATION, lightning_attention_forward, register

register()

__all__ = [
    "ATTN_IMPLEMENTATION",
    "FlashAttention",
    "attention_backend",
    "flash_attention",
    "flash_attention_backward",
    "lightning_attention_forward",
]
