"""Tokens, FLOPs and MFU of the training loop on padded instruction batches of varying length: padding is not
counted as tokens, each batch's FLOPs use its own sequence length, a given peak gives the MFU."""

from __future__ import annotations

import pytest
import torch
from _precision_helpers import MetricsRecorder, loader
from lightning.pytorch import Trainer

from lightning_llm import PretrainModule, RunSummary, ThroughputCallback

VOCAB = 256
# (sequence length of the padded batch, real tokens of each row): as pad_collate makes them, each batch padded
# to its longest row, with `num_tokens` per row.
BATCHES = [(16, [16, 5, 9]), (7, [3, 7, 7]), (32, [32, 1, 20]), (11, [2, 11, 4])]


def padded_batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    batches = []
    for seq, lengths in BATCHES:
        ids = torch.randint(1, VOCAB, (len(lengths), seq + 1), generator=gen)
        real = torch.arange(seq + 1) < torch.tensor(lengths)[:, None]
        ids = ids.where(real, 0)  # pad id 0
        targets = ids[:, 1:].where(real[:, 1:], -100)
        batches.append({"input_ids": ids[:, :-1], "targets": targets,
                        "position_ids": torch.arange(seq).expand(len(lengths), seq).where(real[:, :-1], 0),
                        "num_tokens": torch.tensor(lengths)})
    return batches


def hand_flops_per_token(seq: int) -> int:
    """The `tiny` preset counted by hand: d 64, 2 layers, 4 query heads and 2 K/V heads of 16, MLP 192, tied head."""
    d, layers, heads, kv_heads, head_dim, d_ff = 64, 2, 4, 2, 16, 192
    per_layer = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim + 3 * d * d_ff
    n = layers * per_layer + d * VOCAB
    return 6 * n + 12 * layers * heads * head_dim * seq


def fit(callbacks, steps: int = len(BATCHES)) -> MetricsRecorder:
    recorder = MetricsRecorder()
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=recorder, log_every_n_steps=1,
                      callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(PretrainModule("tiny", vocab_size=VOCAB, warmup_steps=1), loader(padded_batches()[:steps]))
    return recorder


def test_padding_is_not_counted_and_each_batch_has_its_own_length():
    summary = RunSummary()
    recorder = fit([ThroughputCallback(window=1), summary])
    real = [sum(lengths) for _, lengths in BATCHES]
    # before: every position, padding included (48, 69, 165, 198)
    assert recorder.series("train/tokens") == [float(sum(real[:i + 1])) for i in range(len(BATCHES))]
    assert summary._tokens == sum(real)
    # window=1: each logged rate is one batch's; its FLOPs per token are those of its own length (before: the first
    # batch's length for every batch)
    tflops, rates = recorder.series("perf/tflops"), recorder.series("perf/tokens_per_sec")
    assert len(tflops) == len(BATCHES) - 1
    for (seq, _), flops, rate in zip(BATCHES[1:], tflops, rates, strict=True):
        # float32 logging of the two rates: a few float32 roundings, 1e-6 relative leaves a 10x margin
        assert flops * 1e12 / rate == pytest.approx(hand_flops_per_token(seq), rel=1e-6)


def test_a_given_peak_gives_the_mfu():
    peak = 1e12  # on a CPU, which has no data-sheet peak
    recorder = fit([ThroughputCallback(window=1, peak_flops=peak)])
    tflops, mfu = recorder.series("perf/tflops"), recorder.series("perf/mfu")
    assert len(mfu) == len(tflops) == len(BATCHES) - 1
    for flops, utilisation in zip(tflops, mfu, strict=True):
        assert utilisation == pytest.approx(flops * 1e12 / peak, rel=1e-6)  # (float32 logging, as above)


@pytest.mark.parametrize("peak", [0, -1.0, float("inf"), float("nan"), "989e12", True])
def test_peak_flops_must_be_a_positive_number(peak):
    with pytest.raises(ValueError, match=r"peak_flops must be a finite number of FLOP/s > 0"):
        ThroughputCallback(peak_flops=peak)


def test_no_peak_is_said_rather_than_an_mfu_made_up(capsys, caplog):
    with caplog.at_level("INFO"):
        recorder = fit([ThroughputCallback(window=1)], steps=2)
    assert recorder.series("perf/tokens_per_sec") and not recorder.series("perf/mfu")
    said = caplog.text + capsys.readouterr().out
    assert "no peak FLOP/s known for 'cpu' in torch.float32" in said and "ThroughputCallback(peak_flops=...)" in said
