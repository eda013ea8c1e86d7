"""Benchmark callbacks under the other layouts of `ParallelStrategy` against one process on the same weights:
pipeline parallelism (pp2, pp2 x dp2, pp2 x tp2), context parallelism (cp2, ring and all-to-all) and expert parallelism
(dp2 x ep2 on tiny-moe).

Each job is tests/test_eval_sharded.py's: train two steps, run a multiple-choice task and a generative task
whose stop strings end the generations at different lengths, call the adapter directly with more requests on
one evaluation rank than on the other, train one more step; the test reruns the evaluation on one process from
the weights the ranks evaluated.

- Pipeline: each rank holds only its stages, so the strategy's `evaluating` context redirects the causal LM's
  forward through the stages (every rank of a pipeline gets the logits) and the ranks of one pipeline take the
  same requests; generation runs without a KV cache.
- Context parallelism: outside the steps attention sees whole sequences, so the context-parallel ranks take
  different requests (the evaluation group is data x context).
- Expert parallelism: every forward's all-to-all needs every rank, so the ranks with less work make throwaway
  calls and generation runs with synced_gpus.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from eval_support import one_thread  # noqa: F401 (the fixture)
from test_eval_sharded import (
    assert_evaluations_equal,
    assert_generations_end_at_different_lengths,
    assert_training_continues,
    evaluated_on_one_process,
    spawn,
)
from lightning_llm.strategies.parallel import ParallelStrategy
from lightning_llm.strategies import pipeline
from lightning_llm.strategies.pipeline import EVAL_SCHEDULES_KEPT, Pipeline, padded_length

pytestmark = pytest.mark.usefixtures("one_thread")

# Two micro-batches per batch of two rows (GPipe: the pipeline's evaluation schedule whatever the training one).
PIPELINE = dict(pipeline_parallel=2, microbatches=2, schedule="gpipe")


def check_layout(tmp_path, world: int, layout: dict, evaluation_ranks: list[int], preset: str = "tiny",
                 timeout: float = 240) -> list[dict]:
    ranks = spawn(world, tmp_path, timeout=timeout, layout=layout, preset=preset)
    assert [rank["data_rank"] for rank in ranks] == evaluation_ranks
    one_process = evaluated_on_one_process(ranks[0]["evaluated"], tmp_path / "one", preset)
    assert_evaluations_equal(ranks, one_process)
    assert_generations_end_at_different_lengths(one_process)
    assert_training_continues(ranks)
    return ranks


# -- pipeline --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pp2_metrics_and_outputs_equal_one_process(tmp_path):
    # The two stages of the one pipeline take the same requests.
    check_layout(tmp_path, 2, PIPELINE, [0, 0])


@pytest.mark.slow
def test_pp2_x_dp2_metrics_and_outputs_equal_one_process(tmp_path):
    # Ranks 0, 1 hold stage 0 of pipelines 0, 1 (their data-parallel coordinate), ranks 2, 3 stage 1.
    check_layout(tmp_path, 4, {**PIPELINE, "data_parallel": 2}, [0, 1, 0, 1], timeout=400)


@pytest.mark.slow
def test_pp2_x_tp2_metrics_and_outputs_equal_one_process(tmp_path):
    # Both tensor-parallel ranks of both stages take the same requests (one pipeline, no data parallelism).
    check_layout(tmp_path, 4, {**PIPELINE, "tensor_parallel": 2}, [0, 0, 0, 0], timeout=400)


def test_pipelined_forward_refuses_a_kv_cache():
    with pytest.raises(ValueError, match="keeps no KV cache .* use_cache=False"):
        Pipeline(**{"size": 2, "microbatches": 2, "schedule": "gpipe"})._pipelined_forward(
            torch.zeros(1, 3, dtype=torch.long), use_cache=True)


@pytest.mark.parametrize("extra", [{"output_hidden_states": True}, {"labels": torch.zeros(1, 3, dtype=torch.long)},
                                   {"output_router_logits": True}, {"return_dict": False}])
def test_pipelined_forward_refuses_what_it_cannot_give(extra):
    # The stages return the last stage's logits only: hidden states, a loss from labels, router logits or a tuple
    # output would be dropped, so they are refused by name.
    name = next(iter(extra))
    with pytest.raises(ValueError, match=f"returns the logits only .* cannot give {name}="):
        Pipeline(**{"size": 2, "microbatches": 2, "schedule": "gpipe"})._pipelined_forward(
            torch.zeros(1, 3, dtype=torch.long), use_cache=False, **extra)


def test_pipelined_forward_takes_what_generation_passes():
    # What `generate` and lm-eval pass besides the inputs asks for nothing the pipeline drops (the pp2 tests above
    # generate through it).
    pipeline._refuse_unsupported({"cache_position": torch.arange(3), "return_dict": True, "output_attentions": False,
                                  "output_hidden_states": False, "inputs_embeds": None})


def test_padded_lengths_are_few_and_close():
    lengths = [padded_length(n) for n in range(1, 1025)]
    assert all(n <= p <= 1.25 * n for n, p in zip(range(1, 1025), lengths))
    assert len(set(lengths)) <= 8 + 4 * 7  # 1..8, then four per octave up to 1024
    assert lengths[:8] == list(range(1, 9)) and padded_length(17) == 20 and padded_length(33) == 40
    assert [padded_length(n, 2) for n in (1, 5, 17)] == [2, 6, 20]


def test_evaluation_schedules_are_reused_and_bounded(monkeypatch):
    # Generation without a KV cache asks for one more position at every step: 64 steps from a 5-token prompt
    # build a schedule only where the padded length changes, and keep at most EVAL_SCHEDULES_KEPT of them.
    built = []
    monkeypatch.setattr(pipeline, "PipelineStage", lambda *args, **kwargs: object())
    monkeypatch.setitem(pipeline.SCHEDULES, "gpipe", lambda stage, n, **kwargs: built.append(n) or object())
    stages = Pipeline(2, 2, "gpipe")
    stages.strategy = SimpleNamespace(root_device=torch.device("cpu"))
    stages.stage_modules, stages.stage_ids = [torch.nn.Identity()], [0]
    lengths = [padded_length(n) for n in range(5, 5 + 64)]
    schedules = [stages.schedule_for(False, (2, n), ()) for n in lengths]
    assert len(built) == len(set(lengths)) <= len(lengths) // 3
    assert len(stages._eval_schedules) == EVAL_SCHEDULES_KEPT
    assert stages.schedule_for(False, (2, lengths[-1]), ()) is schedules[-1] and len(built) == len(set(lengths))


def test_evaluating_refuses_another_model_under_a_pipeline():
    strategy = ParallelStrategy(**PIPELINE)
    module = torch.nn.Module()
    module.model = torch.nn.Linear(2, 2)
    strategy._lightning_module = module
    with pytest.raises(ValueError, match="only the pipelined causal LM"):
        with strategy.evaluating(torch.nn.Linear(2, 2)):
            pass


# -- context parallelism ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ring", "all_to_all"])
def test_cp2_metrics_and_outputs_equal_one_process(tmp_path, mode):
    # The two context-parallel ranks take different requests (the evaluation group is data x context).
    check_layout(tmp_path, 2, dict(context_parallel=2, context_parallel_mode=mode), [0, 1])


# -- expert parallelism -----------------------------------------------------------------------------


@pytest.mark.slow
def test_dp2_x_ep2_metrics_and_outputs_equal_one_process(tmp_path):
    check_layout(tmp_path, 2, dict(expert_parallel=2), [0, 1], preset="tiny-moe")
