"""fp16-mixed on CUDA with the project's `MixedPrecision` plugin: losses track a float32 run, the loss
scale is logged every step, and a step whose gradients overflow is skipped (weights, AdamW state and the
learning rate untouched), the scale halved, and the skip counted and logged."""

from __future__ import annotations

from _precision_helpers import MetricsRecorder, PlantOverflow, TinyLM, loader, pattern_batches
from gpu_support import DEVICE, DRY_RUN
from lightning.pytorch import Trainer
from test_precision_mixed import assert_same_tree

from lightning_llm.precision import MixedPrecision

STEPS = 5 if DRY_RUN else 16
OVERFLOW_STEP = 3


def fit(module, plugins, callbacks=(), logger=False) -> Trainer:
    trainer = Trainer(accelerator=DEVICE, devices=1, max_steps=STEPS, plugins=plugins, callbacks=list(callbacks),
                      logger=logger, log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.fit(module, loader(pattern_batches(STEPS)))
    return trainer


def test_fp16_mixed_logs_the_scale_and_skips_an_overflowing_step():
    fp32 = TinyLM()
    fit(fp32, [])
    plant, recorder = PlantOverflow({OVERFLOW_STEP}), MetricsRecorder()
    plugin = MixedPrecision("fp16-mixed", device=DEVICE, init_scale=1024.0)
    module = TinyLM()
    fit(module, [plugin], callbacks=[plant], logger=recorder)

    assert next(module.parameters()).device.type == DEVICE
    # test_precision_mixed.py's tolerance for fp16 against fp32 (from 16 steps of this model), except the step
    # after the planted overflow, which fp32 took and fp16 skipped.
    gaps = [abs(a - b) for a, b in zip(module.losses[:OVERFLOW_STEP + 1], fp32.losses[:OVERFLOW_STEP + 1])]
    assert 0 < max(gaps) < 2e-3, gaps
    assert_same_tree(plant.before[OVERFLOW_STEP]["weights"], plant.after[OVERFLOW_STEP]["weights"])
    assert_same_tree(plant.before[OVERFLOW_STEP]["optimizer"]["state"], plant.after[OVERFLOW_STEP]["optimizer"]["state"])
    assert plant.after[OVERFLOW_STEP]["lr"] == plant.before[OVERFLOW_STEP]["lr"]
    scales = recorder.series("precision/loss_scale")
    assert len(scales) == STEPS and scales[OVERFLOW_STEP] == scales[OVERFLOW_STEP - 1] / 2
    assert recorder.series("precision/overflow") == [float(step == OVERFLOW_STEP) for step in range(STEPS)]
    assert recorder.series("precision/skipped_steps")[-1] == 1.0 and plugin.skipped_steps == 1
