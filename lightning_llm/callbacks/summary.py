"""RunSummary: what a finished fit produced, printed once by rank 0.

    run summary
      checkpoint (last)  runs/tiny/checkpoints/last.ckpt
      checkpoint (best)  runs/tiny/checkpoints/step=400.ckpt  (val/loss 2.31)
      export             runs/tiny/hf
      wall time          312.4 s
      tokens             3,276,800  (10,489 tokens/s over the wall time, validation included)
      best val/loss      2.3104  (step 400)
"""

from __future__ import annotations

import math
import time
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from lightning_llm.callbacks.export import HFExport
from lightning_llm.callbacks.throughput import TokenCounter


class RunSummary(Callback):
    """Print, when `Trainer.fit` ends normally, the checkpoints written (last and best of every
    `ModelCheckpoint`), the Hugging Face export (of an `HFExport`) or LoRA adapter, the wall time, the tokens trained on in
    this fit (all data-parallel ranks) and tokens/s over the wall time, and the best validation loss.

    It prints in the `teardown` hook, which Lightning calls after every callback's `on_fit_end`, so the
    export is written by then whatever the order of the callbacks.

    Args:
        monitor: the logged validation metric whose lowest value is reported.
    """

    def __init__(self, monitor: str = "val/loss") -> None:
        self.monitor = monitor
        self.lines: list[tuple[str, str]] = []  # the summary printed last, as (label, value) rows
        self._start = 0.0
        self._tokens = 0
        self._counter = TokenCounter()
        self._best: tuple[float, int] | None = None  # (value, step)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start, self._tokens, self._best = time.perf_counter(), 0, None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._counter.start(pl_module)  # (after a resumed run's checkpoint has set the module's count)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._tokens += self._counter.step(trainer, pl_module, batch)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        value = float(value)
        if math.isfinite(value) and (self._best is None or value < self._best[0]):
            self._best = (value, trainer.global_step)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        wall = time.perf_counter() - self._start
        lines = []
        for checkpoint in trainer.checkpoint_callbacks:
            if getattr(checkpoint, "last_model_path", ""):
                lines.append(("checkpoint (last)", checkpoint.last_model_path))
            if getattr(checkpoint, "monitor", None) and checkpoint.best_model_path:
                score = checkpoint.best_model_score
                lines.append(("checkpoint (best)", checkpoint.best_model_path + (
                    f"  ({checkpoint.monitor} {float(score):.4g})" if score is not None else "")))
        if not any(label.startswith("checkpoint") for label, _ in lines):
            lines.append(("checkpoint", "none written"))
        exports = [str(c.path) for c in trainer.callbacks if isinstance(c, HFExport) and c.path is not None]
        adapters = [str(c.adapter_path) for c in trainer.callbacks if getattr(c, "adapter_path", None) is not None]
        if adapters:  # (a LoRA run: HFExport refuses it, so the hint is the merge)
            none = "none (lightning-llm export --checkpoint CKPT --merge writes the merged model)"
        else:
            none = "none (add HFExport, or --export_dir)"
        lines.append(("export", ", ".join(exports) if exports else none))
        if adapters:
            lines.append(("adapter", ", ".join(adapters)))
        lines.append(("wall time", f"{wall:.1f} s"))
        rate = f"{self._tokens / wall:,.0f}" if wall > 0 else "n/a"
        lines.append(("tokens", f"{self._tokens:,}  ({rate} tokens/s over the wall time, validation included)"))
        if self._best is not None:
            lines.append((f"best {self.monitor}", f"{self._best[0]:.4f}  (step {self._best[1]})"))
        else:
            lines.append((f"best {self.monitor}", "not measured (no validation, or no finite value)"))
        self.lines = lines
        width = max(len(label) for label, _ in lines)
        rank_zero_info("run summary\n" + "\n".join(f"  {label:<{width}}  {value}" for label, value in lines))
