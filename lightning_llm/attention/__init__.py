"""FlashAttention: the Triton kernel, its readable reference and its registration in transformers."""
