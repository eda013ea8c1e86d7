"""Benchmark callbacks on a ZeRO-3 sharded model (2 gloo ranks), and under tensor parallelism (tp2, and
dp2 x tp2 with ZeRO-3), against one process on the same weights.

Under `ZeROStrategy(stage=3)` every forward pass all-gathers the parameters, so every rank must make
the same number of forward passes even when the ranks have unequal work. The 2-rank job trains two
steps, runs a multiple-choice task (loglikelihood) and a generative task whose stop strings end the
generations at different lengths (generate_until), then calls the adapter directly with a different
number of requests on each rank, and trains one more step. The test reruns everything on one process
from the weights the ranks evaluated. tests/test_eval_layouts.py runs the same job under the other layouts of
`ParallelStrategy` (pipeline, context and expert parallelism) with these helpers.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.utils.data import DataLoader

from eval_support import FIXTURES, U32, one_thread, small_tokenizer, tiny_model
from lightning_llm.callbacks.benchmarks import LMEvalCallback
from lightning_llm.eval import tasks
from lightning_llm.eval.lm_adapter import LightningLM, within_root_forward
from lightning_llm.protocols import evaluation_group, whole_model_evaluation
from lightning_llm.strategies.parallel import ParallelStrategy
from lightning_llm.strategies.zero import ZeROStrategy

pytestmark = pytest.mark.usefixtures("one_thread")

EVAL_STEP, STEPS = 2, 3  # evaluate after the second optimizer step, then train one more
MAX_GEN_TOKS = 8
# Frequent characters as stop strings: generations end after different numbers of tokens, so in
# each `generate` call one rank finishes before the other and keeps making forward passes.
UNTIL = ["e", "\n"]
# Direct calls of the adapter with more requests on rank 0 than on rank 1 (batch size 1): rank 1
# runs out of work first and must match rank 0's remaining forward passes / generate calls.
PAIRS = [("Question: 2 + 2 =", " 4"), ("def f(x):", "\n    return x"), ("x = ", "[1, 2, 3]"), ("import", " os")]
CONTEXTS = ["def f(x):", "Question: how many legs does a spider have?", "x"]
GEN = {"until": ["\u2603 never produced \u2603"], "max_gen_toks": 5, "do_sample": False}
# How far a log-likelihood may move when a layout changes only the order of float32 sums: ZeRO's and tensor
# parallelism's reductions, a pipeline's padded shapes and micro-batches, experts' outputs summed rank by rank,
# tiled attention under context parallelism. Each reordered sum of k terms rounds differently by about sqrt(k)
# unit roundoffs (u = 2^-24) of its terms' size, and what reaches a score stays proportional to it: on a token's
# path through these 2-layer models about 20 such sums (q/k/v/o and MLP projections, attention softmax, norms,
# router, the LM head over the vocabulary, the log-softmax) of k <= 192 terms, and the sum over the continuation's
# tokens: 20 x sqrt(192) ~ 2^8 u relative to |score|; the abs term covers scores near 0. Measured: at most 4 u |score|.
# A wrong position, token, mask or expert moves a score by whole units.
SCORE_REL, SCORE_ABS = 2**8 * U32, 2**-20


class TinyLM(pl.LightningModule):
    """The tiny Llama (or `preset`), created in `configure_model` (on the meta device under ZeRO, then sharded).
    A `PipelinedTraining` module, so that a pipeline can train it; batches are dicts of input ids and targets."""

    def __init__(self, preset: str = "tiny"):
        super().__init__()
        self.tokenizer = small_tokenizer()
        self.preset = preset
        self.model = None

    def configure_model(self):
        if self.model is None:
            self.model = tiny_model(self.tokenizer, preset=self.preset).train()

    def loss_sum(self, logits, targets):
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")

    def log_training_step(self, batch, loss):
        pass

    def training_step(self, batch, batch_idx):
        # (context parallelism adds the position ids of this rank's share of each sequence)
        logits = self.model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids")).logits
        return self.loss_sum(logits, batch["targets"]) / batch["targets"].numel()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class FixtureTasks(LMEvalCallback):
    FOLDERS = tasks.BENCHMARK_FOLDERS  # index only the benchmarks' folders of lm-eval (the full index takes seconds)


def benchmark_callback() -> LMEvalCallback:
    """ARC-Challenge (multiple choice: loglikelihood) and GSM8K (generate_until) on the fixture data."""
    gsm8k = tasks.benchmark_task("gsm8k", FIXTURES / "gsm8k", num_fewshot=0)
    gsm8k = {**gsm8k, "generation_kwargs": {**gsm8k["generation_kwargs"], "until": UNTIL}}
    arc = tasks.benchmark_task("arc_challenge", FIXTURES / "ai2_arc", num_fewshot=0)
    # Three documents each: rank 0 gets two, rank 1 one (lm-eval pads its requests with repeats).
    return FixtureTasks([arc, gsm8k], num_fewshot=0, limit=3, batch_size=2, max_gen_toks=MAX_GEN_TOKS, bootstrap_iters=0,
                        every_n_steps=EVAL_STEP, on_fit_end=False)


def direct_outputs(model, tokenizer, rank: int, strategy: object = None) -> dict:
    """The adapter called directly with rank `rank`'s share: rank 0 all requests, rank 1 one of each kind, inside
    `strategy`'s evaluation context (under a pipeline: the forward through the stages)."""
    pairs, contexts = (PAIRS, CONTEXTS) if rank == 0 else (PAIRS[1:2], CONTEXTS[1:2])
    with whole_model_evaluation(strategy, model) as calls:
        lm = LightningLM(model, tokenizer, batch_size=1, progress=False, calls=calls)
        return {"loglikelihood": lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]),
                "generate_until": lm.generate_until([Instance("generate_until", {}, (c, GEN), i)
                                                     for i, c in enumerate(contexts)])}


def loader():
    # Three batches of two rows for each of two data-parallel replicas (a pipeline splits each into two micro-batches).
    tokens = torch.randint(0, 512, (4 * STEPS, 17), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": t[:-1], "targets": t[1:]} for t in tokens]
    return DataLoader(rows, batch_size=2)


# -- what runs in the spawned processes ----------------------------------------------------------


def full_weights(trainer, model) -> dict[str, torch.Tensor]:
    """The whole parameters, gathered from the shards (and a pipeline's stages) onto rank 0 (the other ranks get
    an empty dict)."""
    join = getattr(trainer.strategy, "full_model_state_dict", None)  # ParallelStrategy's
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = join(model) if join is not None else get_model_state_dict(model, options=options)
    return {k: v.clone() for k, v in (state or {}).items()}


class Recorder(pl.Callback):
    """After the benchmark callback's evaluation: the evaluated weights, training mode, direct calls."""

    def __init__(self, record: dict):
        self.record = record

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.record.setdefault("losses", []).append(outputs["loss"].item())
        if trainer.global_step != EVAL_STEP:
            return
        self.record["training_after_eval"] = [m.training for m in pl_module.modules()]
        self.record["evaluated"] = full_weights(trainer, pl_module.model)
        # The ranks of one tensor-parallel group or pipeline share a coordinate in the evaluation group, and so
        # their requests.
        group = evaluation_group(trainer.strategy)
        data_rank = dist.get_rank(group) if group is not None else dist.get_rank()
        self.record["data_rank"] = data_rank
        self.record["direct"] = within_root_forward(
            pl_module, lambda: direct_outputs(pl_module.model, pl_module.tokenizer, data_rank, trainer.strategy))
        self.record["training_after_direct"] = [m.training for m in pl_module.modules()]

    def on_train_end(self, trainer, pl_module):
        self.record["final"] = full_weights(trainer, pl_module.model)
        self.record["steps"] = trainer.global_step


def _worker(rank: int, world: int, port: int, out: str, layout: dict | None, preset: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    record: dict = {}
    try:
        callback = benchmark_callback()
        # A hung collective fails after the timeout instead of blocking the test run.
        options = dict(process_group_backend="gloo", timeout=timedelta(seconds=60))
        strategy = ZeROStrategy(stage=3, **options) if layout is None else ParallelStrategy(**layout, **options)
        trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=STEPS,
                             callbacks=[callback, Recorder(record)], logger=False, default_root_dir=out,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(TinyLM(preset), loader())
        record["metrics"] = callback.metrics
        record["samples"] = callback.results and callback.results["samples"]
    except BaseException as err:
        record["error"] = f"rank {rank}: {type(err).__name__}: {err}"
        raise
    finally:
        torch.save(record, Path(out) / f"rank{rank}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int, out: Path, timeout: float = 180, layout: dict | None = None, preset: str = "tiny") -> list[dict]:
    """Train and evaluate on `world` processes under `ParallelStrategy(**layout)` (None: `ZeROStrategy(stage=3)`)."""
    context = mp.get_context("spawn")
    port = free_port()
    workers = [context.Process(target=_worker, args=(rank, world, port, str(out), layout, preset)) for rank in range(world)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout)
    hung = [w for w in workers if w.exitcode is None]
    for worker in hung:
        worker.kill()
        worker.join()
    records = [torch.load(out / f"rank{r}.pt", weights_only=False) if (out / f"rank{r}.pt").exists() else {}
               for r in range(world)]
    errors = [r.get("error") for r in records if r.get("error")]
    assert not hung and not errors, f"{len(hung)} rank(s) hung; errors: {errors}"
    assert all(w.exitcode == 0 for w in workers)
    return records


# -- the test ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn(2, tmp_path_factory.mktemp("sharded_eval"))


def evaluated_on_one_process(weights: dict[str, torch.Tensor], root: Path, preset: str = "tiny") -> dict:
    """The same callback and direct calls on one process, on `weights` (what the ranks evaluated)."""
    module = TinyLM(preset)
    module.configure_model()
    module.model.load_state_dict(weights)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=root,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    callback = benchmark_callback()
    callback.evaluate(trainer, module)
    return {"metrics": callback.metrics, "samples": callback.results["samples"],
            "direct": [direct_outputs(module.model, module.tokenizer, rank) for rank in range(2)]}


@pytest.fixture(scope="module")
def one_process(ranks, tmp_path_factory):
    return evaluated_on_one_process(ranks[0]["evaluated"], tmp_path_factory.mktemp("one"))


def test_metrics_and_per_sample_outputs_equal_one_process(ranks, one_process):
    assert_evaluations_equal(ranks, one_process)


def assert_evaluations_equal(ranks: list[dict], one_process: dict) -> None:
    """Every rank's metrics and direct calls, and rank 0's gathered samples, equal the one-process ones."""
    for rank in ranks:  # the metrics are broadcast to every rank
        assert rank["metrics"] == one_process["metrics"]
        # The direct calls of each data-parallel coordinate (every rank of its tensor-parallel group alike).
        expected = one_process["direct"][rank["data_rank"]]
        assert rank["direct"]["generate_until"] == expected["generate_until"]
        for (a, greedy_a), (b, greedy_b) in zip(rank["direct"]["loglikelihood"], expected["loglikelihood"], strict=True):
            assert a == pytest.approx(b, rel=SCORE_REL, abs=SCORE_ABS) and greedy_a == greedy_b
    assert all(rank["samples"] is None for rank in ranks[1:]), "only rank 0 gathers the samples"
    assert set(one_process["metrics"]) >= {"bench/arc_challenge/acc", "bench/arc_challenge/acc_norm", "bench/gsm8k/exact_match"}
    sharded = ranks[0]["samples"]
    assert set(sharded) == set(one_process["samples"]) == {"arc_challenge", "gsm8k"}
    for task, samples in one_process["samples"].items():
        # Gathered: rank 0's documents, then rank 1's (for each answer filter).
        gathered, samples = (sorted(x, key=lambda s: (s["filter"], s["doc_id"])) for x in (sharded[task], samples))
        assert [s["doc_id"] for s in gathered] == [s["doc_id"] for s in samples]
        for mine, reference in zip(gathered, samples):
            # [0]: lm-eval pads the rank with fewer requests with repeats of its last request,
            # whose answers it appends to that request (a second, equal response).
            for mine_resp, ref_resp in ((m[0], r[0]) for m, r in zip(mine["resps"], reference["resps"], strict=True)):
                if isinstance(ref_resp, tuple):  # (log-likelihood, is_greedy)
                    assert mine_resp[0] == pytest.approx(ref_resp[0], rel=SCORE_REL, abs=SCORE_ABS)
                    assert mine_resp[1] == ref_resp[1]
                else:  # generated text
                    assert mine_resp == ref_resp


def test_generations_end_at_different_lengths(one_process):
    assert_generations_end_at_different_lengths(one_process)


def assert_generations_end_at_different_lengths(one_process: dict) -> None:
    # What makes the sharded generation non-trivial: unequal lengths across documents (and ranks).
    tokenizer = small_tokenizer()
    gsm8k = one_process["samples"]["gsm8k"]
    responses = [s["resps"][0][0] for s in gsm8k]
    lengths = [len(tokenizer.encode(r)) for r in responses]
    assert len(set(lengths)) > 1 and min(lengths) < MAX_GEN_TOKS, (lengths, responses)


def test_direct_calls_with_unequal_work_equal_one_process(ranks, one_process):
    assert [rank["data_rank"] for rank in ranks] == [0, 1]
    assert len(one_process["direct"][0]["generate_until"]) > len(one_process["direct"][1]["generate_until"])


def test_training_mode_restored_and_training_continues(ranks):
    assert_training_continues(ranks)


def assert_training_continues(ranks: list[dict]) -> None:
    for rank in ranks:
        assert all(rank["training_after_eval"]) and all(rank["training_after_direct"])
        assert rank["steps"] == STEPS and len(rank["losses"]) == STEPS
        assert all(torch.isfinite(torch.tensor(rank["losses"])))
    # The full state dicts are gathered on rank 0.
    assert ranks[1]["evaluated"] == {} and set(ranks[0]["final"]) == set(ranks[0]["evaluated"])
    changed = [k for k, v in ranks[0]["final"].items() if not torch.equal(v, ranks[0]["evaluated"][k])]
    assert len(changed) == len(ranks[0]["final"]), "the step after the evaluation did not update every weight"


# Tensor parallelism: the ranks of a tensor-parallel group hold slices of one model and take the same
# requests; the data-parallel ranks split them (dp2 x tp2: ranks 0 and 1 evaluate rank 0's share).


@pytest.mark.slow
def test_tp2_metrics_and_outputs_equal_one_process(tmp_path):
    ranks = spawn(2, tmp_path, layout=dict(tensor_parallel=2))
    assert [rank["data_rank"] for rank in ranks] == [0, 0]
    assert_evaluations_equal(ranks, evaluated_on_one_process(ranks[0]["evaluated"], tmp_path / "one"))
    assert_training_continues(ranks)


@pytest.mark.slow
def test_dp2_x_tp2_metrics_and_outputs_equal_one_process(tmp_path):
    ranks = spawn(4, tmp_path, timeout=400, layout=dict(tensor_parallel=2))
    assert [rank["data_rank"] for rank in ranks] == [0, 0, 1, 1]
    assert_evaluations_equal(ranks, evaluated_on_one_process(ranks[0]["evaluated"], tmp_path / "one"))
    assert_training_continues(ranks)
