"""Precision plugins: fp16 with dynamic loss scaling, bf16, bf16 weights with fp32 master copies."""
