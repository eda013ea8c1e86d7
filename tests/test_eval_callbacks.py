"""Benchmark callbacks in a Trainer: same numbers as lm-eval's HFLM on the trained model, logged and written."""

import csv
import json
import logging
import re
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from eval_support import FIXTURES, one_thread, small_tokenizer, tiny_model
from lightning_llm.callbacks.benchmarks import (
    ARCChallengeCallback, GSM8KCallback, HumanEvalCallback, LMEvalCallback, MMLUCallback, bench_metrics,
)
from lightning_llm.callbacks.export import HFExport
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
    # A group or tag in data_dirs failed with "TypeError: unhashable type: 'list'".
    with pytest.raises(ValueError, match=r"data_dirs\['ai2_arc'\]: 'ai2_arc' is an lm-eval tag of 2 tasks; .*"
                                         r"\['arc_challenge', 'arc_easy'\]"):
        ARCFolderCallback(["ai2_arc"], data_dirs={"ai2_arc": FIXTURES / "ai2_arc"})
    with pytest.raises(ValueError, match="need 1 <= k <= n_samples"):
        HumanEvalCallback(n_samples=2, k=[5], temperature=0.8)
    with pytest.raises(ValueError, match="set temperature > 0"):
        HumanEvalCallback(n_samples=4, k=[1])
    with pytest.raises(ValueError, match="every_n_steps must be a positive int or None, got 0"):
        ARCChallengeCallback(every_n_steps=0)


# Generative tasks of one's own, in lm-eval's format: one sets max_gen_toks: 32, the other none.
CUSTOM_TASKS = FIXTURES / "custom_tasks"
REPOSITORY = Path(__file__).parent.parent  # the fixture YAMLs name their data file relative to it


def export(module, directory):
    module.model.save_pretrained(directory)
    module.tokenizer.save_pretrained(directory)
    return str(directory)


def test_generative_tasks_keep_their_own_length_as_in_hflm(tmp_path, monkeypatch):
    monkeypatch.chdir(REPOSITORY)
    callback = ARCFolderCallback(["capped_gen", "default_gen"], include_path=CUSTOM_TASKS, max_gen_toks=8,
                                 batch_size=4, limit=3, bootstrap_iters=0)
    module = TinyLM()
    fit = trainer(tmp_path, [])
    fit.strategy.connect(module)
    callback.evaluate(fit, module)

    # Oracle: lm-eval's own model class and task manager on the exported model, with the same
    # default length for tasks that set none (HFLM's is a fixed 256).
    class HFLMWithDefault(HFLM):
        max_gen_toks = 8

    hflm = HFLMWithDefault(pretrained=export(module, tmp_path / "exported"), device="cpu", batch_size=4, dtype="float32")
    oracle = simple_evaluate(hflm, tasks=["capped_gen", "default_gen"], limit=3, bootstrap_iters=0, log_samples=True,
                             task_manager=TaskManager(include_defaults=False, include_path=str(CUSTOM_TASKS)))
    for task in ("capped_gen", "default_gen"):
        ours, theirs = callback.results["samples"][task], oracle["samples"][task]
        assert [s["arguments"] for s in ours] == [s["arguments"] for s in theirs], task
        assert [s["resps"] for s in ours] == [s["resps"] for s in theirs], task
    lengths = [len(module.tokenizer.encode(s["resps"][0][0])) for s in callback.results["samples"]["capped_gen"]]
    assert max(lengths) > 8, "capped_gen generates up to its own 32 tokens, not the callback's 8"


def test_tasks_by_yaml_path_and_include_path_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(REPOSITORY)
    module = TinyLM()
    fit = trainer(tmp_path, [])
    fit.strategy.connect(module)
    by_name = ARCFolderCallback(["default_gen"], include_path=[CUSTOM_TASKS], max_gen_toks=4, limit=2, bootstrap_iters=0)
    by_path = ARCFolderCallback([str(CUSTOM_TASKS / "default_gen.yaml")], max_gen_toks=4, limit=2, bootstrap_iters=0)
    by_name.evaluate(fit, module), by_path.evaluate(fit, module)
    assert [s["resps"] for s in by_path.results["samples"]["default_gen"]] == \
        [s["resps"] for s in by_name.results["samples"]["default_gen"]]
    # An explicit override reaches the task, and leaves the user's config dict as it was.
    spec = load_yaml(CUSTOM_TASKS / "default_gen.yaml", resolve_func=True)
    overridden = ARCFolderCallback([spec], gen_kwargs={"max_gen_toks": 2}, limit=2, bootstrap_iters=0)
    overridden.evaluate(fit, module)
    assert spec == load_yaml(CUSTOM_TASKS / "default_gen.yaml", resolve_func=True)
    short = [s["resps"][0][0] for s in overridden.results["samples"]["default_gen"]]
    longer = [s["resps"][0][0] for s in by_name.results["samples"]["default_gen"]]  # greedy, 4 tokens
    assert all(b.startswith(a) for a, b in zip(short, longer)) and short != longer

    with pytest.raises(ValueError, match=r"unknown lm-eval task 'default_gen'.*include_path=<folder of task YAMLs>"):
        ARCFolderCallback(["default_gen"])
    with pytest.raises(ValueError, match=r"include_path takes folders.*capped_gen.yaml' is a file: name it in tasks"):
        ARCFolderCallback(["capped_gen"], include_path=CUSTOM_TASKS / "capped_gen.yaml")
    with pytest.raises(FileNotFoundError, match=r"include_path: no such folder .*nowhere"):
        ARCFolderCallback(["capped_gen"], include_path=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"task YAML 'nowhere/my_task.yaml': no such file"):
        ARCFolderCallback(["nowhere/my_task.yaml"])


def test_explicit_generation_overrides_are_logged(monkeypatch, caplog):
    monkeypatch.chdir(REPOSITORY)
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)  # Lightning's logger, seen by caplog
    with caplog.at_level(logging.INFO):
        override = ARCFolderCallback(["capped_gen", "default_gen", "arc_challenge"], include_path=CUSTOM_TASKS,
                                     data_dirs={"arc_challenge": FIXTURES / "ai2_arc"}, gen_kwargs={"max_gen_toks": 8})
        HumanEvalCallback(max_gen_toks=16)
        HumanEvalCallback()
    assert override.gen_kwargs == {"max_gen_toks": 8}
    lines = [r.getMessage() for r in caplog.records if "replace these generation settings" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "capped_gen: max_gen_toks 32 -> 8; default_gen: max_gen_toks (unset) -> 8" in lines[0]
    assert "arc_challenge" not in lines[0]  # not generative: nothing changes
    assert "humaneval: max_gen_toks 1024 -> 16" in lines[1]


class StepRecorder(pl.Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, *args):
        self.steps.append(trainer.global_step)


def test_missing_task_data_fails_before_training(tmp_path):
    missing = tmp_path / "absent.jsonl"
    task = {"task": "broken", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(missing)}},
            "output_type": "generate_until", "test_split": "test", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}"}
    recorder = StepRecorder()
    with pytest.raises(FileNotFoundError, match=rf"task 'broken': its data cannot be found .*{re.escape(str(missing))}.*Fix: correct"):
        trainer(tmp_path, [recorder, ARCFolderCallback([task])]).fit(TinyLM(), loader())
    assert recorder.steps == []

    # A task YAML in include_path whose data file is missing; a hub dataset offline and not cached.
    (tmp_path / "tasks").mkdir()
    yaml = (CUSTOM_TASKS / "_short_answer.yaml").read_text().replace("tests/fixtures/eval/gsm8k/main", str(tmp_path / "moved"))
    (tmp_path / "tasks" / "moved_data.yaml").write_text(yaml + "task: moved_data\n")
    with pytest.raises(FileNotFoundError, match=r"task 'moved_data': its data cannot be found .*moved/test-00000-of-00001.jsonl"):
        ARCFolderCallback(["moved_data"], include_path=tmp_path / "tasks")
    hub = {**task, "dataset_path": "lightning-llm-tests/no-such-dataset", "dataset_kwargs": None}
    with pytest.raises(FileNotFoundError, match=r"task 'broken': .*hub dataset 'lightning-llm-tests/no-such-dataset'.*"
                                                r"data_dirs=\{'broken': <folder>\}"):
        ARCFolderCallback([hub])


def test_generation_longer_than_the_window_fails_before_training(tmp_path):
    recorder = StepRecorder()
    # lm-eval's humaneval generates up to 1024 tokens; the test model's window is 512.
    with pytest.raises(ValueError, match=r"max_gen_toks of \{'humaneval': 1024\} leaves no room .* window of 512 tokens"):
        trainer(tmp_path, [recorder, HumanEvalCallback(limit=1)]).fit(TinyLM(), loader())
    assert recorder.steps == []


def test_a_failed_evaluation_stops_the_run_after_its_step_is_checkpointed_and_names_the_task(tmp_path):
    # The data goes away after the callback checked it (a data volume unmounted mid-run): the evaluation at
    # step 2 fails. ModelCheckpoint saves step 2 (Lightning runs it after every other callback), then the run
    # stops before step 3 with an error naming the callback, the task, the step and the cause.
    data = tmp_path / "gsm8k"
    shutil.copytree(FIXTURES / "gsm8k", data)
    callback = GSM8KCallback(data, num_fewshot=0, limit=2, max_gen_toks=4, every_n_steps=2)
    (data / "main" / "test-00000-of-00001.jsonl").unlink()
    recorder = StepRecorder()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    with pytest.raises(RuntimeError, match=r"GSM8KCallback: evaluating \['gsm8k'\] at step 2 failed with "
                                           r"FileNotFoundError: .*test-00000-of-00001.jsonl") as failure:
        trainer(tmp_path, [callback, recorder, checkpoints], max_steps=6, enable_checkpointing=True).fit(TinyLM(), loader())
    assert isinstance(failure.value.__cause__, FileNotFoundError)
    assert "a run resumed from that step does not repeat this evaluation" in str(failure.value)
    assert recorder.steps == [0, 1]  # no step after the failed evaluation
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0-step=2.ckpt"]
    assert torch.load(tmp_path / "ckpt" / "epoch=0-step=2.ckpt", weights_only=False)["global_step"] == 2


def test_a_failed_evaluation_at_fit_end_leaves_the_export_written(tmp_path):
    data = tmp_path / "ai2_arc"
    shutil.copytree(FIXTURES / "ai2_arc", data)
    callback = ARCChallengeCallback(data, limit=2)
    (data / "ARC-Challenge" / "test-00000-of-00001.jsonl").unlink()
    module = TinyLM()
    with pytest.raises(RuntimeError, match=r"ARCChallengeCallback: evaluating \['arc_challenge'\] at step 2 failed"), \
            pytest.warns(UserWarning, match=r"HFExport: the run ended with RuntimeError; the model had been exported to"):
        trainer(tmp_path, [callback, HFExport(tmp_path / "hf")]).fit(module, loader())
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")  # HFExport, listed after the callback, ran
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), module.model.state_dict().values()))


def test_limit_and_humaneval_options_are_refused_as_typed():
    # lm-eval reads a limit >= 1 as int(limit): 2.5 evaluated 2 documents of each task, silently.
    for limit in (2.5, 1.5, float("inf"), 0, -1, True):
        with pytest.raises(ValueError, match=rf"limit must be a count \(an int >= 1\) or a fraction in \(0, 1\), got {limit!r}"):
            ARCChallengeCallback(FIXTURES / "ai2_arc", limit=limit)
    assert ARCChallengeCallback(FIXTURES / "ai2_arc", limit=3.0).limit == 3
    # A negative temperature was read as greedy decoding; workers=0 failed only once the programs ran, after training.
    with pytest.raises(ValueError, match=r"temperature must be >= 0 \(0: greedy\), got -0.5"):
        HumanEvalCallback(temperature=-0.5, max_gen_toks=16)
    with pytest.raises(ValueError, match=r"workers must be an int >= 1 .*got 0"):
        HumanEvalCallback(workers=0, max_gen_toks=16)


def test_two_evaluations_at_one_step_keep_both_results(tmp_path):
    # Two benchmark runs at one step (here two callbacks of one task in one validation) wrote one file name:
    # the second replaced the first's results.
    callbacks = [ARCChallengeCallback(FIXTURES / "ai2_arc", limit=limit, bootstrap_iters=0) for limit in (2, 3)]
    trainer(tmp_path, callbacks).validate(TinyLM(), loader())
    files = sorted((tmp_path / "lightning_logs" / "version_0" / "lm_eval").glob("*.json"))
    assert [f.name for f in files] == ["arc_challenge-step0-2.json", "arc_challenge-step0.json"]
    assert [len(json.loads(f.read_text())["samples"]["arc_challenge"]) for f in files] == [3, 2]
