"""Benchmark callbacks in a Trainer: same numbers as lm-eval's HFLM on the trained model, logged and written."""

import csv
import json
import shutil

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from torch.utils.data import DataLoader

from eval_support import FIXTURES, one_thread, small_tokenizer, tiny_model
from lightning_llm.callbacks.benchmarks import (
    ARCChallengeCallback, GSM8KCallback, HumanEvalCallback, LMEvalCallback, MMLUCallback, bench_metrics,
)
from lightning_llm.eval import tasks

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyLM(pl.LightningModule):
    def __init__(self, tokenizer=None, with_tokenizer=True):
        super().__init__()
        self.model = tiny_model(tokenizer or small_tokenizer())
        if with_tokenizer:
            self.tokenizer = tokenizer or small_tokenizer()

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch, labels=batch).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def loader(vocab=512):
    return DataLoader(torch.randint(0, vocab, (8, 16), generator=torch.Generator().manual_seed(0)), batch_size=2)


def trainer(tmp_path, callbacks, **kwargs):
    options = dict(accelerator="cpu", devices=1, max_steps=2, logger=CSVLogger(tmp_path), callbacks=callbacks,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0)
    return pl.Trainer(**{**options, **kwargs})


def test_fit_end_metrics_equal_hflm_on_the_trained_model(tmp_path):
    callbacks = [
        MMLUCallback(FIXTURES / "mmlu", subjects=["abstract_algebra", "high_school_geography"], num_fewshot=1, batch_size=4),
        ARCChallengeCallback(FIXTURES / "ai2_arc", batch_size=4),
        GSM8KCallback(FIXTURES / "gsm8k", num_fewshot=1, max_gen_toks=16, limit=2),
        HumanEvalCallback(max_gen_toks=16, limit=3),
    ]
    module = TinyLM()
    fit = trainer(tmp_path, callbacks)
    fit.fit(module, loader())

    exported = tmp_path / "exported"
    module.model.save_pretrained(exported)
    module.tokenizer.save_pretrained(exported)
    hflm = HFLM(pretrained=str(exported), device="cpu", batch_size=4, dtype="float32")
    # The adapter's parity with HFLM is tested task by task elsewhere; here the callbacks' options
    # (subjects, few-shot, limit, generation length) must reach lm-eval as they would from its own API.
    oracle_specs = [
        (tasks.mmlu_group(tasks.mmlu_configs(FIXTURES / "mmlu", ["abstract_algebra", "high_school_geography"], 1)), 1, None, 256),
        (tasks.benchmark_task("gsm8k", FIXTURES / "gsm8k", 1), 1, 2, 16),
    ]
    for callback, (spec, shots, limit, max_gen_toks) in zip(callbacks[::2], oracle_specs):
        oracle = simple_evaluate(hflm, tasks=[spec], num_fewshot=shots, limit=limit, bootstrap_iters=1000,
                                 gen_kwargs={"max_gen_toks": max_gen_toks}, confirm_run_unsafe_code=True,
                                 task_manager=tasks.task_manager(tasks.BENCHMARK_FOLDERS))
        assert callback.metrics == pytest.approx(bench_metrics(oracle)), type(callback).__name__

    logged = {}
    with open(fit.logger.log_dir + "/metrics.csv") as f:
        for row in csv.DictReader(f):
            logged.update({k: float(v) for k, v in row.items() if v and k.startswith("bench/")})
    for key in ("bench/mmlu/acc", "bench/arc_challenge/acc", "bench/arc_challenge/acc_norm",
                "bench/arc_challenge/acc_stderr", "bench/gsm8k/exact_match",
                "bench/gsm8k/exact_match_flexible-extract", "bench/humaneval/pass@1"):
        assert key in logged, key
    assert logged["bench/mmlu/acc"] == pytest.approx(callbacks[0].metrics["bench/mmlu/acc"])
    assert not any(k.startswith("bench/mmlu_") for k in logged), "subjects are logged only with log_subtasks"

    written = sorted((tmp_path / "lightning_logs" / "version_0" / "lm_eval").glob("*.json"))
    assert len(written) == 4
    humaneval = json.loads(next(p for p in written if p.name.startswith("humaneval")).read_text())
    sample = humaneval["samples"]["humaneval"][0]
    assert {"completion", "passed", "result"} <= set(sample["filtered_resps"][0][0])


def test_validate_returns_bench_metrics_and_training_rng_is_untouched(tmp_path):
    callback = ARCChallengeCallback(FIXTURES / "ai2_arc", limit=3, on_fit_end=False)
    module = TinyLM()
    draws = []
    for callbacks in ([], [callback]):  # the same validation without and with the benchmark
        torch.manual_seed(123)
        results = trainer(tmp_path, callbacks).validate(module, loader())
        draws.append(torch.rand(3))
    assert torch.equal(*draws), "the evaluation changed the global random state"
    (metrics,) = results
    assert metrics["bench/arc_challenge/acc"] == pytest.approx(callback.metrics["bench/arc_challenge/acc"])
    assert 0.0 <= metrics["bench/arc_challenge/acc"] <= 1.0


class CountingARC(ARCChallengeCallback):
    """Records when it would evaluate (the schedule is what is tested here)."""

    def __init__(self, **kwargs):
        super().__init__(FIXTURES / "ai2_arc", **kwargs)
        self.steps = []

    def evaluate(self, trainer, pl_module, use_module_log=False):
        self.steps.append(trainer.global_step)
        self._last_step = trainer.global_step
        return {}


def test_schedule_every_n_steps_with_accumulation_and_epochs(tmp_path):
    by_step = CountingARC(every_n_steps=2)
    trainer(tmp_path, [by_step], max_steps=4, accumulate_grad_batches=2, max_epochs=None).fit(
        TinyLM(), DataLoader(torch.randint(0, 512, (16, 8)), batch_size=2))
    assert by_step.steps == [2, 4]  # once per optimizer step, and not again at fit end (step 4 done)

    by_epoch = CountingARC(every_n_epochs=2, on_fit_end=False)
    trainer(tmp_path, [by_epoch], max_steps=-1, max_epochs=4).fit(TinyLM(), DataLoader(torch.randint(0, 512, (2, 8)), batch_size=2))  # one step per epoch
    assert by_epoch.steps == [2, 4]


class ARCFolderCallback(LMEvalCallback):
    # Index only lm-eval's ARC folder: the full index takes seconds to build.
    FOLDERS = ("arc",)


def test_generic_callback_reads_parquet_in_hub_layout(tmp_path):
    datasets = pytest.importorskip("datasets")
    # allenai/ai2_arc's layout, as parquet files: <dir>/ARC-Easy/test-00000-of-00001.parquet
    (tmp_path / "arc" / "ARC-Easy").mkdir(parents=True)
    for split in ("test", "train"):
        source = FIXTURES / "ai2_arc" / "ARC-Challenge" / f"{split}-00000-of-00001.jsonl"
        datasets.load_dataset("json", data_files=str(source), split="train").to_parquet(
            str(tmp_path / "arc" / "ARC-Easy" / f"{split}-00000-of-00001.parquet"))
    callback = ARCFolderCallback(["arc_easy"], data_dirs={"arc_easy": tmp_path / "arc"}, limit=4, bootstrap_iters=0)
    json_callback = ARCChallengeCallback(FIXTURES / "ai2_arc", limit=4, bootstrap_iters=0)
    module = TinyLM()
    fit = trainer(tmp_path, [])
    fit.strategy.connect(module)
    easy, challenge = callback.evaluate(fit, module), json_callback.evaluate(fit, module)
    # Same documents and prompts (arc_easy and arc_challenge share their template): same accuracy.
    assert easy["bench/arc_easy/acc"] == challenge["bench/arc_challenge/acc"]


def test_clear_errors(tmp_path):
    with pytest.raises(AttributeError, match="need a tokenizer"):
        trainer(tmp_path, [ARCChallengeCallback(FIXTURES / "ai2_arc")]).fit(TinyLM(with_tokenizer=False), loader())
    with pytest.raises(FileNotFoundError, match=r"expected a directory .*gsm8k/ARC-Challenge"):
        ARCChallengeCallback(FIXTURES / "gsm8k")
    wrong = tmp_path / "gsm"
    shutil.copytree(FIXTURES / "gsm8k", wrong)
    (wrong / "main" / "train-00000-of-00001.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"main/train-00000-of-00001.parquet .* for split 'train'"):
        GSM8KCallback(wrong)  # 5-shot needs the train split
    GSM8KCallback(wrong, num_fewshot=0)  # zero-shot does not
    with pytest.raises(ValueError, match="unknown MMLU subject"):
        MMLUCallback(FIXTURES / "mmlu", subjects=["astrology"])
    with pytest.raises(FileNotFoundError, match=r"mmlu_anatomy: .*expected a directory .*anatomy"):
        MMLUCallback(FIXTURES / "mmlu")  # all 57 subjects by default
    with pytest.raises(ValueError, match="unknown lm-eval task 'arc_chalenge'.*arc_challenge"):
        ARCFolderCallback(["arc_chalenge"])
    with pytest.raises(ValueError, match="need 1 <= k <= n_samples"):
        HumanEvalCallback(n_samples=2, k=[5], temperature=0.8)
    with pytest.raises(ValueError, match="set temperature > 0"):
        HumanEvalCallback(n_samples=4, k=[1])
    with pytest.raises(ValueError, match="every_n_steps must be a positive int or None, got 0"):
        ARCChallengeCallback(every_n_steps=0)
