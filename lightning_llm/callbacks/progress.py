"""The progress bar: Lightning's own (Rich when installed, else tqdm) with a total in the units of its count.

A run bounded by `max_steps` gets `max_epochs=-1` from Lightning, and Rich's bar printed "Epoch 0/-2". Its
total was the steps left while its count is the batch index within the epoch, which a resumed epoch
counts from the epoch's start: a run resumed at batch 7 of 9 showed "9/2". Here the total is the batch of
this epoch at which the run stops (the end of the epoch, or where `max_steps` stops it), and an epoch
without a bound prints no "/max". `lightning-llm fit` uses it unless the config names a progress bar.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE


class _BatchOfEpochTotal:
    """The total of the training bar: the batch index (counted from the epoch's start) where it stops."""

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        total = trainer.num_training_batches
        if trainer.max_steps is not None and trainer.max_steps > 0:
            done = trainer.fit_loop.epoch_loop.batch_progress.current.ready  # includes a resumed epoch's earlier batches
            left = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
            total = min(total, done + left)
        return total


class LLMRichProgressBar(_BatchOfEpochTotal, RichProgressBar):
    """Rich's bar, with a total that matches its count and no "/-2" after the epoch of a step-bounded run."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)


class LLMTQDMProgressBar(_BatchOfEpochTotal, TQDMProgressBar):
    """tqdm's bar, with a total that matches its count."""


def default_progress_bar() -> RichProgressBar | TQDMProgressBar:
    """The bar Lightning would pick (Rich when installed), with the totals above."""
    return LLMRichProgressBar() if _RICH_AVAILABLE else LLMTQDMProgressBar()
