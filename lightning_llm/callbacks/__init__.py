"""Callbacks: throughput and MFU, LoRA and QLoRA, benchmarks.

Importing this package silences one false message. On CPUs with AVX512-BF16, bitsandbytes logs at import
(and peft imports bitsandbytes whenever it is installed) "Failed to load CPU gemm_4bit_forward from
kernels-community": it could not fetch a fused 4-bit matmul kernel from the hub. The project's 4-bit
layers never take that path (`lora.dequantize_in_every_matmul` keeps them on dequantize-then-matmul) and a
run needs no network, so that message, and only that one, is dropped; every other bitsandbytes record passes.
"""

import logging

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
FUSED_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_the_fused_kernel_message(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(FUSED_KERNEL_MESSAGE)


logging.getLogger(BITSANDBYTES_CPU_LOGGER).addFilter(_not_the_fused_kernel_message)
