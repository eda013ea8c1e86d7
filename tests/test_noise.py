"""Messages that mislead are gone at their source: each test captures what a run, a resume or an import
prints and asserts the false message is absent (and that the mechanism leaves other messages alone)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from eval_support import FIXTURES
from test_eval_callbacks import TinyLM, loader, trainer

from lightning_llm.callbacks import BITSANDBYTES_CPU_LOGGER, FUSED_KERNEL_MESSAGE
from lightning_llm.callbacks.benchmarks import ARCChallengeCallback


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



def test_an_evaluation_outside_a_git_repository_prints_no_git_error(tmp_path, monkeypatch, capfd):
    # git writes "fatal: not a git repository" to the process's stderr (fd 2), which capfd captures.
    outside = tmp_path / "not-a-repository"
    outside.mkdir()
    monkeypatch.chdir(outside)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # (git must not find a repository above it)
    callback = ARCChallengeCallback(FIXTURES / "ai2_arc", limit=2, bootstrap_iters=0, on_fit_end=False)
    (metrics,) = trainer(tmp_path, [callback]).validate(TinyLM(), loader())
    assert "not a git repository" not in capfd.readouterr().err
    assert callback.results["git_hash"] is None  # nothing to record here, as lm-eval's own fallback says
    assert 0.0 <= metrics["bench/arc_challenge/acc"] <= 1.0
