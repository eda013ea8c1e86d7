"""Messages that mislead are gone at their source: each test captures what a run, a resume or an import
prints and asserts the false message is absent (and that the mechanism leaves other messages alone)."""

from __future__ import annotations

import logging
import os
import subprocess
import socket
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.strategies import DDPStrategy

from eval_support import FIXTURES
from test_cli import tiny_config
from test_eval_callbacks import TinyLM, loader, trainer

from lightning_llm.callbacks import BITSANDBYTES_CPU_LOGGER, FUSED_KERNEL_MESSAGE
from lightning_llm.callbacks.benchmarks import ARCChallengeCallback
from lightning_llm.cli import main
from lightning_llm.data.pretrain import PretrainDataModule
from lightning_llm.modules.pretrain import PretrainModule


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
    config.pop("export_dir")
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


def _fit_two_ranks(rank, port, root, corpus_dir, tokenizer_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    data = PretrainDataModule(corpus_dir, tokenizer=tokenizer_dir, block_size=32, batch_size=2, max_val_blocks=4,
                              cache_dir=os.path.join(root, "cache"))
    trainer = Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"), max_steps=2,
                      val_check_interval=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root)
    module = PretrainModule("tiny", warmup_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=data)
        # a benchmark in `validate` logs its metrics through the module too
        bench = ARCChallengeCallback(FIXTURES / "ai2_arc", limit=2, bootstrap_iters=0, on_fit_end=False)
        Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"), logger=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, limit_val_batches=1,
                callbacks=[bench]).validate(module, datamodule=data)
    Path(root, f"warnings{rank}.txt").write_text("\n".join(str(w.message) for w in caught))
    dist.destroy_process_group()


def test_two_ranks_validating_and_benchmarking_get_no_sync_dist_warning(tmp_path, corpus_dir, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    PretrainDataModule(str(corpus_dir), tokenizer=str(tmp_path / "tok"), block_size=32,
                       cache_dir=str(tmp_path / "cache")).prepare_data()  # (tokenized once, before the ranks start)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_fit_two_ranks, args=(port, str(tmp_path), str(corpus_dir), str(tmp_path / "tok")), nprocs=2,
                       start_method="spawn")
    for rank in range(2):
        printed = (tmp_path / f"warnings{rank}.txt").read_text()
        assert "sync_dist" not in printed, printed
