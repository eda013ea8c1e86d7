"""HFExport: at the end of a successful fit, the trained model as a Hugging Face directory.

The folder is what `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load.
Every rank takes part (sharded weights are gathered to rank 0, which writes); the write is atomic and
refuses non-finite weights (`lightning_llm.export.save_pretrained_atomic`). A run that ends in an
exception (a divergence, Ctrl-C) exports nothing and says so.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_llm.checkpoint import export_refusal
from lightning_llm.export import check_exportable, export_module

DEFAULT_SUBDIR = "hf"  # under trainer.default_root_dir


class HFExport(Callback):
    """Write the LightningModule's `model` as a Hugging Face directory when `Trainer.fit` ends normally.

    Args:
        dirpath: the export directory; default `<trainer.default_root_dir>/hf`.
        overwrite: replace an existing, non-empty export there. When False, such a directory stops the
            run before training starts (not after it), naming the directory. Even when True, a directory
            that is not an earlier export (it holds checkpoints or logs, or no config.json) stops the run
            before training: the export would delete it.
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, overwrite: bool = False) -> None:
        self.dirpath = dirpath
        self.overwrite = overwrite
        self.path: Path | None = None  # the export written, once it is (on rank 0)

    def export_dir(self, trainer: Trainer) -> Path:
        return Path(self.dirpath if self.dirpath is not None else Path(trainer.default_root_dir) / DEFAULT_SUBDIR)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        out = self.export_dir(trainer)
        # Rank 0 writes, so its view of the file system decides (broadcast: every rank stops together).
        refusal = trainer.strategy.broadcast(export_refusal(out, self.overwrite))
        if refusal is not None and not self.overwrite:
            raise FileExistsError(f"HFExport: the export directory {str(out)!r} exists and is not empty (another run "
                                  "may read it); remove it, choose another dirpath, or pass overwrite=True "
                                  "(command line: --export_overwrite=true)")
        if refusal is not None:  # overwrite, but what is there is not an earlier export: refused now, not after training
            raise FileExistsError(f"HFExport: {refusal} (command line: --export_dir)")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        check_exportable(pl_module)  # before training, not after it

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out = self.export_dir(trainer)
        replacing = out.exists()
        self.path = export_module(pl_module, out, overwrite=self.overwrite)
        if self.path is not None:
            rank_zero_info(f"exported the model to {self.path}{' (replacing the export there)' if replacing else ''}")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # A callback's failure after `on_fit_end` (a benchmark's, raised at teardown) comes after the export.
        done = f"the model had been exported to {self.path}" if self.path is not None else \
            f"nothing was exported to {self.export_dir(trainer)}"
        rank_zero_warn(f"HFExport: the run ended with {type(exception).__name__}; {done}")
