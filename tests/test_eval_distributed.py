"""Data-parallel evaluation: two gloo ranks each score their share; gathered results equal one process's."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lm_eval import simple_evaluate

from eval_support import FIXTURES, one_thread, small_tokenizer, tiny_model
from lightning_llm.eval import tasks
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
