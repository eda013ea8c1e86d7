"""Messages that mislead are gone at their source: each test captures what a run, a resume or an import
prints and asserts the false message is absent (and that the mechanism leaves other messages alone)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import yaml
from lightning.pytorch import Callback

from eval_support import FIXTURES
from test_cli import tiny_config
from test_eval_callbacks import TinyLM, loader, trainer

from lightning_llm.callbacks import BITSANDBYTES_CPU_LOGGER, FUSED_KERNEL_MESSAGE
from lightning_llm.callbacks.benchmarks import ARCChallengeCallback
from lightning_llm.cli import main


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


class BarReadings(Callback):
    """What the progress bar shows after each batch: its count (Lightning's: the batch of the epoch), its
    total, its description. (A class attribute: the CLI builds the callback.)"""

    readings: list[tuple[int, int, str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar = trainer.progress_bar_callback
        self.readings.append((batch_idx + 1, bar.total_train_batches, bar._get_train_description(trainer.current_epoch).strip()))


def test_a_resumed_step_bounded_run_shows_a_bar_whose_total_matches_its_count(tmp_path, corpus_dir):
    config = tiny_config(tmp_path, corpus_dir)
    config["trainer"].update(enable_progress_bar=True, max_steps=4)
    config["data"]["init_args"]["train_blocks"] = 28  # 7 batches an epoch: the resume lands mid-epoch
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(tmp_path / "run.yaml")])
    config["trainer"]["max_steps"] = 6
    config["trainer"]["callbacks"].append({"class_path": "test_noise.BarReadings"})
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(tmp_path / "resume.yaml"), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")])
    # batches 5 and 6 of the epoch, of the 6 the run stops at (Lightning's default bar: "5/2", "6/2")
    readings = BarReadings.readings
    assert [(count, total) for count, total, _ in readings] == [(5, 6), (6, 6)]
    assert {description for _, _, description in readings} == {"Epoch 0"}  # not "Epoch 0/-2"
