"""QLoRA on CUDA: the frozen base stored in NF4 and multiplied through bitsandbytes' CUDA kernels, a LoRA
adapter trained with bfloat16 compute for a few steps. Every loss is finite, the loss falls, every adapter
weight gets a finite, nonzero gradient and no base weight gets one."""

from __future__ import annotations

import math

import bitsandbytes as bnb
import torch
from _precision_helpers import VOCAB, loader, pattern_batches
from gpu_support import DEVICE, DRY_RUN
from lightning.pytorch import Callback, Trainer

from lightning_llm.callbacks.lora import QLoRACallback
from lightning_llm.modules.pretrain import PretrainModule

STEPS = 6 if DRY_RUN else 12


class Recorder(Callback):
    """Each step's loss, and the gradients of the last backward pass by parameter name."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grads: dict[str, torch.Tensor | None] = {}

    def on_after_backward(self, trainer, pl_module) -> None:
        self.grads = {name: None if p.grad is None else p.grad.detach().clone()
                      for name, p in pl_module.model.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


def test_qlora_trains_through_bitsandbytes_kernels(tmp_path):
    if DEVICE == "cuda":
        assert bnb.cextension.BNB_BACKEND == "CUDA"
    torch.manual_seed(0)
    recorder = Recorder()
    module = PretrainModule("tiny", vocab_size=VOCAB, lr=1e-2, warmup_steps=1)
    trainer = Trainer(accelerator=DEVICE, devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=[QLoRACallback(r=8, compute_dtype="bfloat16"), recorder])
    trainer.fit(module, loader(pattern_batches(STEPS)))

    quantized = [m for m in module.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 14  # 7 linear layers in each of the 2 decoder blocks (the head stays tied)
    assert all(m.weight.dtype == torch.uint8 and m.weight.device.type == DEVICE for m in quantized)
    print("losses:", recorder.losses)
    assert len(recorder.losses) == STEPS and all(math.isfinite(loss) for loss in recorder.losses)
    assert sum(recorder.losses[-3:]) < sum(recorder.losses[:3])
    adapter = {name: g for name, g in recorder.grads.items() if ".lora_A." in name or ".lora_B." in name}
    assert len(adapter) == 2 * len(quantized)
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in adapter.values())
    assert all(g is None for name, g in recorder.grads.items() if name not in adapter)
