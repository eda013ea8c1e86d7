"""Messages that mislead are gone at their source: each test captures what a run, a resume or an import
prints and asserts the false message is absent (and that the mechanism leaves other messages alone)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from lightning_llm.callbacks import BITSANDBYTES_CPU_LOGGER, FUSED_KERNEL_MESSAGE


def test_importing_the_lora_callbacks_prints_no_bitsandbytes_kernel_warning():
    # (a fresh process: bitsandbytes logs the message once, when it is first imported)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    run = subprocess.run([sys.executable, "-c", "import lightning_llm.callbacks.lora"], capture_output=True, text=True,
                         env=env, timeout=300, check=True)
    assert "gemm_4bit_forward" not in run.stderr + run.stdout


def test_the_filter_drops_that_message_only(caplog):
    # The import test can fail only on a CPU with AVX512-BF16 (where bitsandbytes logs it): this one
    # sends the record bitsandbytes sends, on any CPU, beside another record of the same logger.
    import lightning_llm.callbacks.lora  # noqa: F401  (imports bitsandbytes, as a LoRA run does)

    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    with caplog.at_level(logging.WARNING, logger=BITSANDBYTES_CPU_LOGGER):
        logger.warning(FUSED_KERNEL_MESSAGE + ": %s. Please make sure you already `pip install kernels`", "no kernels")
        logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
