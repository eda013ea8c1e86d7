"""MixedPrecision: fp16/bf16 autocast tracks fp32, dynamic loss scaling skips overflowing steps
without touching weights, optimizer state or the LR schedule, logs what it does, and stops a run that
only skips."""

from __future__ import annotations

import pytest
import torch
from _precision_helpers import MetricsRecorder, PlantOverflow, TinyLM, loader, pattern_batches
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from lightning_llm.precision import MixedPrecision


def fit(module, plugins, steps, *, callbacks=(), logger=False, **trainer_kwargs) -> Trainer:
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, plugins=plugins, callbacks=list(callbacks),
                      logger=logger, log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **trainer_kwargs)
    trainer.fit(module, loader(pattern_batches(steps * trainer.accumulate_grad_batches)))
    return trainer


@pytest.fixture(scope="module")
def fp32_losses() -> list[float]:
    module = TinyLM()
    fit(module, [], 16)
    return module.losses


# Measured on this CPU over 16 steps of the tiny model: max |loss - fp32 loss| was ~1e-4 for fp16 and
# 2e-4 for bf16 (fp16 keeps 10 mantissa bits, bf16 7); the tolerances leave a 20x (fp16) and 50x (bf16) margin.
@pytest.mark.parametrize(("precision", "tolerance"), [("fp16-mixed", 2e-3), ("bf16-mixed", 1e-2)])
def test_mixed_precision_tracks_fp32(precision, tolerance, fp32_losses):
    module = TinyLM()
    fit(module, [MixedPrecision(precision, device="cpu")], 16)
    gaps = [abs(a - b) for a, b in zip(module.losses, fp32_losses, strict=True)]
    assert 0 < max(gaps) < tolerance, gaps  # > 0: the run really computed in 16 bits
    assert fp32_losses[-1] < fp32_losses[0] - 0.5  # the run learned something worth tracking


@pytest.mark.parametrize(("precision", "dtype"), [("fp16-mixed", torch.float16), ("bf16-mixed", torch.bfloat16)])
def test_forward_context_autocasts_on_cpu(precision, dtype):
    layer = torch.nn.Linear(4, 4)
    with MixedPrecision(precision, device="cpu").forward_context():
        assert layer(torch.randn(2, 4)).dtype == dtype


def assert_same_tree(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_tree(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        for x, y in zip(a, b, strict=True):
            assert_same_tree(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_planted_overflow_skips_step_backs_off_and_regrows():
    planted = {3}
    growth_interval, warmup = 3, 10
    plant, recorder = PlantOverflow(planted), MetricsRecorder()
    plugin = MixedPrecision("fp16-mixed", device="cpu", init_scale=1024.0, growth_interval=growth_interval)
    module = TinyLM(warmup=warmup)
    trainer = fit(module, [plugin], 10, callbacks=[plant], logger=recorder)

    # The overflowing step changed nothing: weights, AdamW moments and step counts, learning rate.
    assert_same_tree(plant.before[3]["weights"], plant.after[3]["weights"])
    assert_same_tree(plant.before[3]["optimizer"]["state"], plant.after[3]["optimizer"]["state"])
    assert plant.after[3]["lr"] == plant.before[3]["lr"]
    # The steps around it did change the weights and moved the warmup.
    assert not torch.equal(plant.before[2]["weights"]["model.lm_head.weight"],
                           plant.after[2]["weights"]["model.lm_head.weight"])
    assert plant.after[4]["lr"] > plant.before[4]["lr"]

    # Oracle: GradScaler's rule written out: halve on overflow, double after `growth_interval` clean steps.
    expected_scales, scale, clean = [], 1024.0, 0
    for step in range(10):
        if step in planted:
            scale, clean = scale / 2, 0
        else:
            clean += 1
            if clean == growth_interval:
                scale, clean = scale * 2, 0
        expected_scales.append(scale)
    assert [plant.after[step]["scale"] for step in range(10)] == expected_scales
    # Both a back-off and a growth after it happened in these 10 steps.
    assert expected_scales[3] == expected_scales[2] / 2 and max(expected_scales[4:]) > expected_scales[3]

    # The schedule advanced once per step that was taken: 9 of 10.
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 9
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(module.lr * min(1.0, 10 / warmup))

    # What the loggers got.
    assert recorder.series("precision/loss_scale") == expected_scales
    assert recorder.series("precision/skipped_steps") == [0.0] * 3 + [1.0] * 7
    assert recorder.series("precision/overflow") == [float(step in planted) for step in range(10)]
    assert plugin.skipped_steps == 1


def test_run_that_only_skips_stops_with_an_error():
    plugin = MixedPrecision("fp16-mixed", device="cpu", max_consecutive_skips=3)
    with pytest.raises(RuntimeError, match=r"skipped 3 optimizer steps in a row.*max_consecutive_skips=3"):
        fit(TinyLM(), [plugin], 10, callbacks=[PlantOverflow(set(range(2, 10)))])
    assert plugin.skipped_steps == 3


def test_state_dict_round_trip_keeps_scale_and_counters():
    plugin = MixedPrecision("fp16-mixed", device="cpu", init_scale=1024.0)
    fit(TinyLM(), [plugin], 3, callbacks=[PlantOverflow({1})])
    restored = MixedPrecision("fp16-mixed", device="cpu")
    restored.load_state_dict(plugin.state_dict())
    assert restored.scaler.get_scale() == plugin.scaler.get_scale() == 512.0
    assert restored.skipped_steps == 1


def expected_scales(scale: float, clean: int, steps: range, planted: set[int], growth_interval: int,
                    backoff: float) -> list[float]:
    """GradScaler's rule written out: back off on overflow, double after `growth_interval` clean steps in a row."""
    scales = []
    for step in steps:
        if step in planted:
            scale, clean = scale * backoff, 0
        else:
            clean += 1
            if clean == growth_interval:
                scale, clean = scale * 2, 0
        scales.append(scale)
    return scales


def test_resume_keeps_the_scale_and_this_runs_growth_and_backoff(tmp_path):
    # The first run: 5 clean steps at growth_interval 2000, so the checkpoint holds scale 1024 and 5 clean steps.
    first = MixedPrecision("fp16-mixed", device="cpu", init_scale=1024.0, growth_interval=2000)
    trainer = fit(TinyLM(), [first], 5, default_root_dir=tmp_path)
    ckpt = tmp_path / "first.ckpt"
    trainer.save_checkpoint(ckpt)
    # Resumed with other options: torch's GradScaler.load_state_dict put back the checkpoint's interval and
    # back-off (2000, 0.5) over the ones given here, and a count of clean steps (5) past the new interval
    # (3) never equals it again, so the scale never grew.
    plant = PlantOverflow({7})
    resumed = MixedPrecision("fp16-mixed", device="cpu", init_scale=8.0, growth_interval=3, backoff_factor=0.25)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=12, plugins=[resumed], callbacks=[plant], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TinyLM(), loader(pattern_batches(12)), ckpt_path=ckpt)
    assert (resumed.scaler.get_growth_interval(), resumed.scaler.get_backoff_factor()) == (3, 0.25)
    # The scale continues from the checkpoint's; its 5 clean steps already exceed the new interval, so it
    # grows at the first clean step.
    assert [plant.after[step]["scale"] for step in range(5, 12)] == expected_scales(
        1024.0, 2, range(5, 12), {7}, growth_interval=3, backoff=0.25)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(precision="fp8-mixed"), r"precision='fp8-mixed': expected one of 'fp16-mixed', '16-mixed', 'bf16-mixed'"),
    (dict(precision="fp16-mixed", device="cuda"), r"autocast on device='cuda' is not possible"),
    (dict(precision="fp16-mixed", device="gpu0"), r"device='gpu0' is not a torch device type"),
    (dict(precision="fp16-mixed", backoff_factor=2.0), r"backoff_factor=2.0: must be in \(0, 1\)"),
    (dict(precision="fp16-mixed", growth_factor=1.0), r"growth_factor=1.0: must be > 1.0"),
    (dict(precision="fp16-mixed", max_consecutive_skips=0), r"max_consecutive_skips=0: must be > 0"),
])
def test_bad_arguments_fail_at_construction(kwargs, message):
    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match=message):
        MixedPrecision(**kwargs)


def test_fused_optimizer_is_refused():
    class Fused(TinyLM):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)

    with pytest.raises(ValueError, match="unscales inside its .fused. step"):
        fit(Fused(), [MixedPrecision("fp16-mixed", device="cpu")], 1)


def test_yaml_config_builds_the_plugin(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  accelerator: cpu\n"
        "  plugins:\n"
        "    - class_path: lightning_llm.precision.MixedPrecision\n"
        "      init_args: {precision: fp16-mixed, growth_interval: 100}\n"
    )
    cli = LightningCLI(TinyLM, run=False, args=["--config", str(config)], save_config_callback=None)
    plugin = cli.trainer.precision_plugin
    assert isinstance(plugin, MixedPrecision)
    assert (plugin.precision, plugin.dtype, plugin.scaler.get_growth_interval()) == ("16-mixed", torch.float16, 100)
