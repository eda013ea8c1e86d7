"""Data-parallel evaluation: two gloo ranks each score their share; gathered results equal one process's."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lm_eval import simple_evaluate

from eval_support import FIXTURES, one_thread, small_tokenizer, tiny_model
from lightning_llm.eval import run, tasks
from lightning_llm.eval.lm_adapter import LightningLM

pytestmark = pytest.mark.usefixtures("one_thread")


def fixture_tasks():
    return [tasks.benchmark_task("arc_challenge", FIXTURES / "ai2_arc"),
            tasks.benchmark_task("gsm8k", FIXTURES / "gsm8k", num_fewshot=1)]


def evaluate(lm):
    return simple_evaluate(lm, tasks=fixture_tasks(), num_fewshot=1, bootstrap_iters=0, gen_kwargs={"max_gen_toks": 12},
                           task_manager=tasks.task_manager(tasks.BENCHMARK_FOLDERS))


def _rank(rank: int, world_size: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:  # any failure reaches the test through the queue instead of a timeout
        tokenizer = small_tokenizer()
        lm = LightningLM(tiny_model(tokenizer), tokenizer, batch_size=2, progress=False)
        assert (lm.rank, lm.world_size) == (rank, world_size)
        results = evaluate(lm)
        queue.put((rank, None if results is None else {
            "results": results["results"], "samples": {t: len(s) for t, s in results["samples"].items()}}))
    except BaseException as err:
        queue.put((rank, f"rank {rank} failed: {type(err).__name__}: {err}"))
        raise
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process():
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    workers = [context.Process(target=_rank, args=(rank, 2, port, queue)) for rank in range(2)]
    for worker in workers:
        worker.start()
    gathered = dict(queue.get(timeout=300) for _ in workers)
    assert not any(isinstance(g, str) for g in gathered.values()), gathered
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert gathered[1] is None, "only rank 0 returns results"

    tokenizer = small_tokenizer()
    single = evaluate(LightningLM(tiny_model(tokenizer), tokenizer, batch_size=2, progress=False))
    assert gathered[0]["samples"] == {t: len(s) for t, s in single["samples"].items()}
    for task, values in single["results"].items():
        for key, value in values.items():
            if "," in key and isinstance(value, float):
                assert gathered[0]["results"][task][key] == pytest.approx(value), (task, key)


def arc_with_sampled_shots(root):
    """ARC-Challenge in the hub layout with 9 questions and 6 training examples: lm-eval's default sampler
    draws 2 of the 6 for each question (the fixture's single training example leaves it no choice)."""
    words = "apple river stone light metal water plant energy force cloud solid liquid heat sound wave magnet".split()
    rows = {"test": 9, "train": 6}
    for split, n in rows.items():
        folder = root / "ARC-Challenge"
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            question = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(4 + i % 5)) + "?"
            choices = [" ".join(words[(i + j * 5 + k) % len(words)] for k in range(1 + j % 3)) for j in range(4)]
            lines.append(json.dumps({"id": f"{split}-{i}", "question": question, "answerKey": "ABCD"[i % 4],
                                     "choices": {"text": choices, "label": list("ABCD")}}))
        (folder / f"{split}-00000-of-00001.jsonl").write_text("\n".join(lines) + "\n")
    return root


def sampled_shots_evaluation(lm, data, run_simple_evaluate, limit=None):
    return run_simple_evaluate(lm, tasks=[tasks.benchmark_task("arc_challenge", data, 2)], num_fewshot=2, limit=limit,
                               bootstrap_iters=0, log_samples=True, task_manager=tasks.task_manager(tasks.BENCHMARK_FOLDERS))


def _sampled_shots_rank(rank: int, world_size: int, port: int, data, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        tokenizer = small_tokenizer()
        lm = LightningLM(tiny_model(tokenizer), tokenizer, batch_size=3, progress=False)
        results = sampled_shots_evaluation(lm, data, run.simple_evaluate)
        try:
            sampled_shots_evaluation(lm, data, run.simple_evaluate, limit=1)
            refusal = None
        except ValueError as err:
            refusal = str(err)
        # HumanEval, 2 samples of each of 3 problems: rank 1 (one problem) runs its last request again to match
        # rank 0's count (lm-eval's padding), and lm-eval appended those answers to the problem's.
        humaneval = run.simple_evaluate(lm, tasks=[tasks.humaneval_task(n_samples=2, k=[1, 2], temperature=0.8, max_gen_toks=6)],
                                        limit=3, bootstrap_iters=0, log_samples=True, confirm_run_unsafe_code=True,
                                        task_manager=tasks.task_manager(tasks.BENCHMARK_FOLDERS))
        queue.put((rank, (refusal, None if results is None else {
            "results": results["results"]["arc_challenge"],
            "prompts": {s["doc_id"]: s["arguments"] for s in results["samples"]["arc_challenge"]},
            "humaneval": {s["doc_id"]: (len(s["resps"][0]), [len(f) for f in s["filtered_resps"]])
                          for s in humaneval["samples"]["humaneval"]}})))
    except BaseException as err:
        queue.put((rank, f"rank {rank} failed: {type(err).__name__}: {err}"))
        raise
    finally:
        dist.destroy_process_group()


def test_two_ranks_build_one_process_prompts_and_score_the_samples_asked_for(tmp_path):
    # lm-eval draws each question's few-shot examples from one generator per task in the order of the rank's own
    # questions: on 2 ranks a question got other examples than on one process, and the score changed with the
    # number of ranks. Oracle: lm-eval's own simple_evaluate on one process.
    data = arc_with_sampled_shots(tmp_path / "ai2_arc")
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    workers = [context.Process(target=_sampled_shots_rank, args=(rank, 2, port, data, queue)) for rank in range(2)]
    for worker in workers:
        worker.start()
    gathered = dict(queue.get(timeout=300) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    assert not any(isinstance(g, str) for g in gathered.values()), gathered
    assert gathered[1][1] is None, "only rank 0 returns results"

    tokenizer = small_tokenizer()
    single = sampled_shots_evaluation(LightningLM(tiny_model(tokenizer), tokenizer, batch_size=3, progress=False),
                                      data, simple_evaluate)
    prompts = {s["doc_id"]: s["arguments"] for s in single["samples"]["arc_challenge"]}
    assert len({args[0][0] for args in prompts.values()}) == 9
    assert gathered[0][1]["prompts"] == prompts  # every question once, with one process's examples
    for key, value in single["results"]["arc_challenge"].items():
        if "," in key and isinstance(value, float):
            assert gathered[0][1]["results"][key] == pytest.approx(value), key
    # Each problem scored on the 2 samples asked for (pass@k's n), as on one process.
    assert gathered[0][1]["humaneval"] == {0: (2, [2]), 1: (2, [2]), 2: (2, [2])}, gathered[0][1]["humaneval"]
    # One question for two ranks leaves one with none: both ranks refuse (lm-eval's rank without documents
    # raised while the other waited for it).
    for rank in range(2):
        assert gathered[rank][0] == ("task 'arc_challenge': 1 document(s) for 2 ranks leave a rank none; "
                                     "evaluate at least 2 (limit) or on fewer ranks"), gathered[rank][0]
