"""PretrainModule(compile=...): blocks compiled one at a time train as the eager model does, on one process,
under activation checkpointing, ZeRO-3, the pipeline and tensor parallelism, and packed batches do not recompile.

Tolerance: fp32 on CPU, the same initial weights and batches. Compiling fuses and reorders operations
(inductor's own reductions for RMSNorm, softmax and the loss), which changes only the order of roundings. A
loss is a mean over BATCH x SEQ = 64 token losses whose logits are dot products over 64 hidden units:
reordering either sum moves it by at most reordered_sum_rtol(fp32, 64) relative; LOSS_RTOL is twice that (as
in tests/test_pipeline.py, whose oracle and batches these tests share). The composition tests run the
"aot_eager" backend (dynamo's capture and AOTAutograd's joint graph, without inductor's code generation,
which takes minutes on a small CPU): what checkpointing, sharding and pipelining interact with is the
captured autograd graph, not the kernels inside it; one test runs inductor itself.

Under tensor parallelism (tp2 with sequence parallelism, inductor) the blocks are traced with DTensor activations
and weights, and each rank sums its share of the dot products over the hidden (64) and intermediate (192) units and
of the log-sum-exp over the vocabulary (128) before the ranks add theirs: more reordered sums, the longest over
the intermediate units, so TP_LOSS_RTOL is twice reordered_sum_rtol(fp32, 192) (tests/test_parallel.py's argument).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from lightning_llm.compile import compile_options
from lightning_llm.models import build_config, build_model
from lightning_llm.modules.pretrain import PretrainModule
from lightning_llm.strategies.parallel import ParallelStrategy, PipelineStrategy
from lightning_llm.strategies.zero import ZeROStrategy
from test_pipeline import BATCH, LOSS_RTOL, LR, VOCAB, TokenData, fit, spawn
from tolerances import reordered_sum_rtol

STEPS = 3
CAPTURE = {"backend": "aot_eager"}
TP_LOSS_RTOL = 2 * reordered_sum_rtol(torch.float32, max(VOCAB, build_config("tiny").intermediate_size))


class Seeded(PretrainModule):
    """PretrainModule on the tiny preset starting from the weights saved at `init_path`."""

    def __init__(self, init_path: str, **kwargs) -> None:
        super().__init__("tiny", vocab_size=VOCAB, lr=LR, warmup_steps=0, max_steps=100, **kwargs)
        self.init_path = init_path

    def build_hf_model(self, **load_kwargs) -> torch.nn.Module:
        model = build_model("tiny", vocab_size=VOCAB, attn_implementation=self.hparams.attn_implementation)
        model.load_state_dict(torch.load(self.init_path))
        return model


@pytest.fixture
def init_path(tmp_path):
    torch._dynamo.reset()  # every test counts its own compiles (and never hits another test's recompile limit)
    counters.clear()
    torch.manual_seed(0)
    path = tmp_path / "init.pt"
    torch.save(build_model("tiny", vocab_size=VOCAB).state_dict(), path)
    return str(path)


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_inductor_blocks_train_as_the_eager_model_does(init_path):
    eager = fit(Seeded(init_path), TokenData(), max_steps=STEPS)
    module = Seeded(init_path, compile=True)
    compiled = fit(module, TokenData(), max_steps=STEPS)
    assert compiled_graphs() == 2  # one graph serves both blocks, one the training loss
    assert compiled == pytest.approx(eager, rel=LOSS_RTOL)
    assert module.trainer.optimizers[0].defaults["fused"]  # fp32 on a CPU: torch's fused AdamW step


class CompileCounts(pl.Callback):
    """Dynamo's count of compiled frames after every training batch."""

    def __init__(self) -> None:
        self.frames: list[int] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.frames.append(counters["frames"]["total"])


# sdpa under activation checkpointing: dynamo captures the checkpointed block whole. lightning_fa2 (no
# checkpointing) runs as an eager call between the block's compiled halves; traced, it would recompile per batch.
@pytest.mark.parametrize("attention, checkpointing", [("sdpa", True), ("lightning_fa2", False)])
def test_packed_batches_of_varying_documents_compile_once(init_path, attention, checkpointing):
    # Every block holds two examples cut at a random point, so every batch has other document boundaries
    # (other position ids; sdpa gets other block-diagonal masks, lightning_fa2 other cu_seqlens), over 5 batches.
    options = dict(attn_implementation=attention, activation_checkpointing=checkpointing)
    eager = fit(Seeded(init_path, **options), TokenData(packed=True), max_steps=5)
    counts = CompileCounts()
    compiled = fit(Seeded(init_path, **options, compile=CAPTURE), TokenData(packed=True), max_steps=5, callbacks=[counts])
    assert counts.frames[0] >= 1 and counts.frames == counts.frames[:1] * 5  # compiled at the first batch, never again
    assert compiled == pytest.approx(eager, rel=LOSS_RTOL)


def test_bad_compile_options_are_refused():
    with pytest.raises(ValueError, match=r"unknown torch.compile option\(s\) \['mdoe'\]"):
        PretrainModule("tiny", compile={"mdoe": "max-autotune"})
    with pytest.raises(ValueError, match="give true, false or a dict"):
        compile_options("yes")


def _distributed(rank, tmp_path) -> dict:
    init = str(tmp_path / "init.pt")
    zero = ZeROStrategy(stage=3, activation_checkpointing=True, empty_init=False)
    pipeline = PipelineStrategy(stages=2, microbatches=2)
    # Both ranks of a tensor-parallel group take the whole batch (sequence parallelism on, the default; the
    # initial weights loaded before the split: empty_init=False). Inductor itself: under tensor parallelism its
    # kernels run on each rank's shards (about a minute more than the capture alone on 2 cores).
    tensor, counts = ParallelStrategy(tensor_parallel=2, empty_init=False), CompileCounts()
    return {
        "tensor": fit(Seeded(init, compile=True), TokenData(packed=True), tensor, 2, STEPS, callbacks=[counts]),
        "tensor_frames": counts.frames,
        # Each rank takes half of every batch; its loss is its share of the global batch's token mean.
        "zero": fit(Seeded(init, compile=CAPTURE), TokenData(batch_size=BATCH // 2, packed=True, split_by_strategy=True),
                    zero, 2, STEPS),
        "pipeline": fit(Seeded(init, compile=CAPTURE), TokenData(packed=True), pipeline, 2, STEPS),
        "graphs": compiled_graphs(),
    }


@pytest.mark.slow
def test_compiled_blocks_compose_with_zero3_checkpointing_the_pipeline_and_tensor_parallelism(init_path, tmp_path):
    reference = fit(Seeded(init_path), TokenData(packed=True), max_steps=STEPS)
    ranks = spawn(_distributed, 2, tmp_path)
    assert all(out["graphs"] >= 1 for out in ranks)  # the blocks ran compiled
    for out in ranks:  # tp2: compiled at the first batch, never again; every rank logs the whole batch's loss
        assert out["tensor_frames"][0] >= 1 and out["tensor_frames"] == out["tensor_frames"][:1] * STEPS
        assert out["tensor"] == pytest.approx(reference, rel=TP_LOSS_RTOL)
    zero = [(a + b) / 2 for a, b in zip(ranks[0]["zero"], ranks[1]["zero"], strict=True)]
    assert zero == pytest.approx(reference, rel=LOSS_RTOL)
    assert all(out["pipeline"] == pytest.approx(reference, rel=LOSS_RTOL) for out in ranks)


def test_the_optimizer_step_is_not_fused_under_a_loss_scaler(init_path):
    # fp16 loss scaling unscales, agrees on overflow and clips before the step; MixedPrecision refuses a
    # fused AdamW (which would unscale inside its step), so the module must not pick one there.
    from lightning_llm.precision import MixedPrecision

    module = Seeded(init_path)
    fit(module, TokenData(), max_steps=1, plugins=[MixedPrecision("fp16-mixed", device="cpu")])
    assert module.trainer.optimizers[0].defaults["fused"] is False


def test_lightning_bf16_mixed_with_clipping_trains_with_the_default_optimizer(init_path):
    # Lightning's own AMP plugin (the "bf16-mixed" string) refuses to clip the gradients of a fused optimizer
    # even with no scaler; the module must not pick one there, and the run (clipping on in `fit`) must train.
    from lightning.pytorch.plugins.precision import MixedPrecision as LightningAMP

    module = Seeded(init_path)
    losses = fit(module, TokenData(), max_steps=2, plugins=[LightningAMP("bf16-mixed", device="cpu")])
    assert len(losses) == 2 and module.trainer.optimizers[0].defaults["fused"] is False
