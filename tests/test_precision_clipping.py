"""Gradient clipping under both plugins acts on the gradients the step applies: unscaled fp32 ones
for fp16-mixed, the fp32 master gradients for MasterWeightsPrecision; with and without accumulation."""

from __future__ import annotations

import pytest
import torch
from _precision_helpers import loader, pattern_batches
from lightning.pytorch import LightningModule, Trainer

from lightning_llm.precision import MasterWeightsPrecision, MixedPrecision


class EmbedLinearSGD(LightningModule):
    """Embedding + linear head and plain SGD(lr=1): a step moves the parameters by exactly -gradient."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Embedding(256, 16), torch.nn.Linear(16, 256))
        self.update: torch.Tensor | None = None

    def training_step(self, batch, batch_idx):
        logits = self.model(batch["input_ids"])
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def on_train_start(self) -> None:
        self.before = [p.detach().clone() for p in self.optimizer_params()]

    def on_train_end(self) -> None:
        self.update = torch.cat([(p.detach() - b).flatten() for p, b in zip(self.optimizer_params(), self.before)])

    def optimizer_params(self) -> list[torch.Tensor]:
        return [p for group in self.trainer.optimizers[0].param_groups for p in group["params"]]


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("plugin", [lambda: MixedPrecision("fp16-mixed", device="cpu"), MasterWeightsPrecision],
                         ids=["fp16-mixed", "master-weights"])
def test_clipped_update_has_norm_clip_val(plugin, accumulate):
    # With SGD(lr=1) a clipped step moves the optimizer's params by a vector of norm clip_val exactly.
    # Clipping the scaled fp16 gradients would leave an update 2^16 times too small; clipping in bf16
    # would be off by bf16's rounding (~4e-3 relative).
    module, clip = EmbedLinearSGD(), 1e-3
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=1, plugins=[plugin()], gradient_clip_val=clip,
                      accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader(pattern_batches(accumulate)))
    assert module.update.norm().item() == pytest.approx(clip, rel=1e-4)
