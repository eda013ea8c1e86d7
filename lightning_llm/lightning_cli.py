"""`lightning-llm fit/validate/test/predict`: LightningCLI over the project's modules and data modules.

Kept apart from `lightning_llm.cli` so that the other commands (`plan`, `--help`, ...) do not import Lightning.
"""

from __future__ import annotations

import csv
import importlib
import io
import os
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info

from lightning_llm.checkpoint import atomic_file, atomic_path, is_local_path

# In a config, this text stands for `trainer.default_root_dir` (Lightning's default: the working directory),
# so `--trainer.default_root_dir X` moves every output named with it: logs, checkpoints, export, adapters.
ROOT = "${trainer.default_root_dir}"
# `--ckpt_path` names that Lightning resolves to a file once the trainer exists (its ModelCheckpoint callbacks, a
# SLURM job's HPC checkpoint): `ckpt_path: last` in a config resumes a requeued job and starts its first run fresh.
CHECKPOINT_NAMES = ("last", "best", "hpc")


class LLMCLI(LightningCLI):
    """LightningCLI with `--export_dir` (after `fit`, the trained model is exported for transformers), a summary
    at the end of every fit, TensorBoard and CSV logs unless the config names a logger, a resume that honours what
    the user typed (`--ckpt_path`), and checks that need no data done first."""

    resume_checkpoint: tuple[str, dict[str, Any]] | None = None

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--export_dir", type=str | None, default=None,
                            help="after a successful fit, write a Hugging Face export of the model here (HFExport)")
        parser.add_argument("--export_overwrite", type=bool, default=False,
                            help="let --export_dir replace an existing export (by default a non-empty one stops the run before training)")

    def parse_arguments(self, parser, args) -> None:
        self._args = args  # parsed again on resume, over the checkpoint's hyper-parameters
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI lays the checkpoint's hyper-parameters over the whole config, dropping what the user
        # typed. Here they become the defaults under the config files and the command line, which win.
        from lightning_llm.checkpoint import load_checkpoint_metadata
        from lightning_llm.resume import changes_table, check_same_architecture, plain, saved_model_config

        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not path or str(path) in CHECKPOINT_NAMES:  # (a name: the trainer finds the file, `before_fit` checks it)
            return
        checkpoint = load_checkpoint_metadata(path)  # (early: an unreadable checkpoint fails before any work)
        self.resume_checkpoint = (str(path), checkpoint)
        class_path = self.config[subcommand]["model"]["class_path"]
        module_name, _, class_name = class_path.rpartition(".")
        saved = saved_model_config(checkpoint, class_path, getattr(importlib.import_module(module_name), class_name))
        if saved is None:
            return
        self._subcommand_parsers[subcommand].set_defaults({"model": saved})
        super().parse_arguments(self.parser, self._args)
        now = plain(self.config[subcommand]["model"]["init_args"])
        check_same_architecture(str(path), checkpoint, saved["init_args"], now)
        rank_zero_info(changes_table(str(path), saved["init_args"], now))

    def _named_checkpoint(self) -> tuple[str, dict[str, Any]] | None:
        """`--ckpt_path last/best/hpc`: the checkpoint file the trainer will resume from (None: none yet, as on a
        job's first run with `ckpt_path: last`), found as Lightning finds it, and its metadata."""
        import warnings

        from lightning.pytorch.trainer.states import TrainerFn

        from lightning_llm.checkpoint import load_checkpoint_metadata
        from lightning_llm.resume import changes_table, check_same_architecture, plain, saved_model_config

        name = self.config[self.subcommand].get("ckpt_path")
        if str(name) not in CHECKPOINT_NAMES:
            return None
        with warnings.catch_warnings():  # ("no last checkpoint": Lightning says it again when fit starts)
            warnings.simplefilter("ignore")
            path = self.trainer._checkpoint_connector._parse_ckpt_path(
                TrainerFn.FITTING, name, model_provided=True, model_connected=True)
        if path is None:
            return None
        checkpoint = load_checkpoint_metadata(path)
        model = self.config[self.subcommand]["model"]
        saved = saved_model_config(checkpoint, model["class_path"], type(self.model))
        if saved is not None:  # (its options cannot be this run's defaults any more: the module is built)
            now = plain(model["init_args"])
            check_same_architecture(str(path), checkpoint, saved["init_args"], now)
            rank_zero_info(changes_table(f"{path} (ckpt_path {name!r})", saved["init_args"], now))
        return str(path), checkpoint

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.get("trainer", {}).get("default_root_dir") or os.getcwd()  # (Lightning's default: the working directory)
        for key, value in config.items():
            config[key] = with_root(value, str(root))

    def before_fit(self) -> None:
        from lightning_llm.strategies.launch import check_launch_size

        check_launch_size(self.trainer.strategy)  # Lightning's strategies too (it checks only launches of its own)
        check_precision_device(self.trainer)
        if self.resume_checkpoint is None:
            self.resume_checkpoint = self._named_checkpoint()
        if self.resume_checkpoint is not None:
            from lightning_llm.resume import check_steps_left

            path, checkpoint = self.resume_checkpoint
            check_steps_left(self.trainer.max_steps, checkpoint.get("global_step"), path)
            state = checkpoint.get(type(self.datamodule).__qualname__) or {}
            check = getattr(self.datamodule, "check_data_order", None)
            if check is not None:  # (the data-parallel size is compared when the trainer restores the state)
                check(state.get("data_order"), checkpoint=path)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        # `--export_dir` is HFExport's dirpath (one export path for Python and the command line); every
        # fit ends with the run summary.
        from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

        from lightning_llm.callbacks.export import HFExport
        from lightning_llm.callbacks.progress import default_progress_bar
        from lightning_llm.callbacks.summary import RunSummary

        # (a copy: the trainer appends its default callbacks to the config's list itself)
        config = self._get(self.config_init, "trainer", default={})
        named = list(config.get("callbacks") or [])
        if config.get("logger") is None and "logger" not in kwargs:  # no logger in the config: both, not CSV alone
            kwargs["logger"] = default_loggers(config.get("default_root_dir") or os.getcwd())
        trainer = super().instantiate_trainer(**kwargs)
        bar = trainer.progress_bar_callback
        if type(bar) in (RichProgressBar, TQDMProgressBar) and not any(bar is callback for callback in named):
            # Lightning's default, not a bar the config names: the same bar with totals that match its count
            trainer.callbacks[trainer.callbacks.index(bar)] = default_progress_bar()
        out = self._get(self.config_init, "export_dir")
        if out:
            trainer.callbacks.append(HFExport(out, overwrite=self._get(self.config_init, "export_overwrite")))
        if not any(isinstance(c, RunSummary) for c in trainer.callbacks):
            trainer.callbacks.append(RunSummary())
        return trainer


def default_loggers(root: str | os.PathLike) -> list[Any]:
    """TensorBoard and CSV logs of one run, side by side in `<root>/lightning_logs/version_N`.

    Lightning's own default is one logger (TensorBoard, or CSV with a warning without tensorboard); here both:
    TensorBoard to look at, the CSV file for `lightning-llm report` and scripts. They share one version, the
    next free N (or the SLURM job id, as Lightning's default, so a requeued job keeps its folder); each logger
    picking its own would split a run over two folders. CSV comes first: it is `trainer.logger`, as it was
    without tensorboard, and it creates the folder before TensorBoard writes there (created second, it would
    warn that the folder is not empty).
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.pytorch.loggers import TensorBoardLogger

    csv = AtomicCSVLogger(root, version=SLURMEnvironment.job_id())
    return [csv, TensorBoardLogger(root, version=csv.version)]


class AtomicExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, whose rewrite of metrics.csv under a new header goes through `atomic_file`,
    and whose hparams.yaml is written through `atomic_path` (Lightning's writes both in place)."""

    def log_hparams(self, params: dict[str, Any]) -> None:
        if not is_local_path(self.log_dir):
            return super().log_hparams(params)
        self.hparams.update(params)
        with atomic_path(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE)) as tmp:
            save_hparams_to_yaml(tmp, self.hparams)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        if not is_local_path(self.metrics_file_path):
            return super()._rewrite_with_new_header(fieldnames)
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        with atomic_file(self.metrics_file_path) as f:
            f.write(text.getvalue().encode())


class AtomicCSVLogger(CSVLogger):
    """Lightning's `CSVLogger` whose metrics.csv is never rewritten in place.

    Lightning's writer appends rows, but when a metric appears that the file has no column for (the first
    validation loss, a benchmark's result) it reads the whole file and writes it again under the new header,
    in place: a run killed then leaves metrics.csv truncated, its history (what `lightning-llm report`
    reads) lost. Here that rewrite goes through `checkpoint.atomic_file`."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AtomicExperimentWriter(log_dir=self.log_dir)
        return self._experiment


def with_root(value: Any, root: str) -> Any:
    """`value` (a config value: a string, or a list or namespace of them) with each `ROOT` replaced by `root`."""
    if isinstance(value, str):
        return value.replace(ROOT, root)
    if isinstance(value, list):
        return [with_root(item, root) for item in value]
    if isinstance(value, Namespace):
        for key, item in value.items():
            value[key] = with_root(item, root)
    if isinstance(value, dict):
        return {key: with_root(item, root) for key, item in value.items()}
    return value


def check_precision_device(trainer: Any) -> None:
    """A precision plugin that autocasts one device type (MixedPrecision) must match the trainer's device."""
    check = getattr(trainer.precision_plugin, "check_device", None)
    try:
        device = trainer.strategy.root_device.type
    except (AssertionError, AttributeError, IndexError, TypeError):  # a strategy that knows its device only once set up
        return
    if check is not None:
        check(device)


class AtomicSaveConfigCallback(SaveConfigCallback):
    """Lightning's `SaveConfigCallback`, whose config.yaml (the run's whole configuration, what reproduces
    it) is written beside its name and renamed into place, not written in place. With `overwrite=False`,
    `multifile` or a remote log folder it is Lightning's own."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.already_saved or not (self.save_to_log_dir and self.overwrite) or self.multifile:
            return super().setup(trainer, pl_module, stage)
        log_dir = trainer.log_dir  # (a broadcast: every rank asks)
        if log_dir is None or not is_local_path(log_dir):
            return super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero:
            os.makedirs(log_dir, exist_ok=True)
            with atomic_file(os.path.join(log_dir, self.config_filename)) as f:
                f.write(self.parser.dump(self.config, skip_none=False).encode())
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


def run_trainer_cli(args: list[str] | None) -> None:
    from lightning_llm.data.pretrain import PretrainDataModule
    from lightning_llm.modules.pretrain import PretrainModule

    LLMCLI(
        PretrainModule, PretrainDataModule,
        subclass_mode_model=True, subclass_mode_data=True,
        save_config_callback=AtomicSaveConfigCallback, save_config_kwargs={"overwrite": True},
        args=args,
    )
