"""The `lightning-llm` command: LightningCLI's fit/validate/test, plus plan, generate and export.

    lightning-llm fit --config examples/pretrain_tiny.yaml
    lightning-llm generate --checkpoint runs/tiny/checkpoints/last.ckpt --prompt "def "
    lightning-llm export --checkpoint runs/tiny/checkpoints/last.ckpt --out runs/tiny/hf
    lightning-llm plan --compute 5.76e23 --plot plan.png

An error prints as one or two lines with the fix; LIGHTNING_LLM_TRACEBACK=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

TRAINER_COMMANDS = ("fit", "validate", "test")
TOOL_COMMANDS = ("plan", "generate", "export")
TRACEBACK_ENV = "LIGHTNING_LLM_TRACEBACK"
# In a config, this text stands for `trainer.default_root_dir` (Lightning's default: the working directory),
# so `--trainer.default_root_dir X` moves every output named with it: logs, checkpoints, export, adapters.
ROOT = "${trainer.default_root_dir}"


class LLMCLI(LightningCLI):
    """LightningCLI with `--export_dir` (after `fit`, the trained model is exported for transformers),
    a resume that honours what the user typed (`--ckpt_path`), and checks that need no data done first."""

    resume_checkpoint: tuple[str, dict[str, Any]] | None = None

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--export_dir", type=str | None, default=None,
                            help="after fit, write a Hugging Face export of the model here")
        parser.add_argument("--export_overwrite", type=bool, default=False,
                            help="let --export_dir replace an existing export (by default a non-empty one is refused before fit)")

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
        if not path:
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

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.get("trainer", {}).get("default_root_dir") or os.getcwd()  # (Lightning's default: the working directory)
        for key, value in config.items():
            config[key] = with_root(value, str(root))

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

        from lightning_llm.callbacks.progress import default_progress_bar

        # (a copy: the trainer appends its default callbacks to the config's list itself)
        named = list(self._get(self.config_init, "trainer", default={}).get("callbacks") or [])
        trainer = super().instantiate_trainer(**kwargs)
        bar = trainer.progress_bar_callback
        if type(bar) in (RichProgressBar, TQDMProgressBar) and not any(bar is callback for callback in named):
            # Lightning's default, not a bar the config names: the same bar with totals that match its count
            trainer.callbacks[trainer.callbacks.index(bar)] = default_progress_bar()
        return trainer

    def before_fit(self) -> None:
        from lightning_llm.checkpoint import is_occupied

        check_precision_device(self.trainer)
        out = self.config[self.subcommand].get("export_dir")
        if out and not self.config[self.subcommand].get("export_overwrite") and is_occupied(Path(out)):
            # (checked before training: an export another run reads must not go unnoticed, nor a run be lost at its end)
            raise FileExistsError(f"export_dir {out!r} exists and is not empty (another run may read it): pass "
                                  "--export_overwrite=true to replace it after fit, or another --export_dir")
        if self.resume_checkpoint is not None:
            path, checkpoint = self.resume_checkpoint
            state = checkpoint.get(type(self.datamodule).__qualname__) or {}
            check = getattr(self.datamodule, "check_data_order", None)
            if check is not None:  # (the data-parallel size is compared when the trainer restores the state)
                check(state.get("data_order"), checkpoint=path)

    def after_fit(self) -> None:
        from lightning_llm.export import export_module

        out = self.config[self.subcommand].get("export_dir")
        if out:
            path = export_module(self.model, out, overwrite=self.config[self.subcommand].get("export_overwrite", False))
            if path is not None:
                print(f"exported the model to {path}")


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


def run_trainer_cli(args: list[str] | None) -> None:
    from lightning_llm.data.pretrain import PretrainDataModule
    from lightning_llm.modules.pretrain import PretrainModule

    LLMCLI(
        PretrainModule, PretrainDataModule,
        subclass_mode_model=True, subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def plan(argv: list[str]) -> None:
    from lightning_llm.scaling import chinchilla_plan, plot_plan

    parser = argparse.ArgumentParser(prog="lightning-llm plan", description="Chinchilla compute-optimal model size and tokens.")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--compute", type=float, help="training budget in FLOPs, e.g. 5.76e23")
    group.add_argument("--params", type=float, help="model size in parameters, e.g. 67e9")
    parser.add_argument("--plot", help="write the plan as a PNG here")
    args = parser.parse_args(argv)
    try:
        result = chinchilla_plan(compute=args.compute, params=args.params)
    except ValueError as err:
        parser.error(str(err))
    print(f"compute  C = {result.compute:.3e} FLOPs")
    print(f"params   N = {result.params:.3e}")
    print(f"tokens   D = {result.tokens:.3e}  ({result.tokens_per_param:.1f} tokens per parameter)")
    if args.plot:
        plot_plan(result, args.plot)
        print(f"plot written to {args.plot}")


def inference_model(path: str) -> tuple[Any, Any]:
    """The model and tokenizer `generate` uses: an export directory, a checkpoint, or a LoRA/QLoRA
    run's adapter checkpoint rebuilt on its base."""
    from lightning_llm.export import is_adapter_checkpoint, load_checkpoint, load_for_inference, tokenizer_from_checkpoint

    source = Path(path) if (Path(path) / "config.json").exists() else load_checkpoint(path)
    if isinstance(source, dict) and is_adapter_checkpoint(source):
        # (imported only here: it imports peft and bitsandbytes)
        from lightning_llm.callbacks.lora import peft_model_from_checkpoint

        return peft_model_from_checkpoint(source), tokenizer_from_checkpoint(source)
    return load_for_inference(source)


def generate(argv: list[str]) -> None:
    import torch

    parser = argparse.ArgumentParser(prog="lightning-llm generate", description="Continue a prompt with a trained model.")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint file or a Hugging Face export directory")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model, tokenizer = inference_model(args.checkpoint)
    if tokenizer is None:
        parser.error(f"{args.checkpoint} carries no tokenizer")
    torch.manual_seed(args.seed)
    ids = tokenizer(args.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.numel() == 0:
        ids = torch.tensor([[tokenizer.eos_token_id]])
    sample = args.temperature > 0
    out = model.generate(
        ids, max_new_tokens=args.max_new_tokens, do_sample=sample, temperature=args.temperature if sample else None,
        top_k=args.top_k if sample else None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    print(tokenizer.decode(out[0], skip_special_tokens=True))


def export(argv: list[str]) -> None:
    from lightning_llm.export import (
        export_checkpoint,
        is_adapter_checkpoint,
        load_checkpoint,
    )

    parser = argparse.ArgumentParser(prog="lightning-llm export", description="Write a checkpoint as a Hugging Face model directory.")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint file or a sharded checkpoint directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--merge", action="store_true",
                        help="LoRA/QLoRA checkpoints: merge the adapter into its base (default: the adapter in peft's format)")
    parser.add_argument("--base", default=None, help="LoRA/QLoRA checkpoints: the base model directory, if not the run's")
    args = parser.parse_args(argv)
    checkpoint = load_checkpoint(args.checkpoint)
    if is_adapter_checkpoint(checkpoint):
        # (imported only here: it imports peft and bitsandbytes)
        from lightning_llm.callbacks.lora import export_lora_checkpoint

        path, error = export_lora_checkpoint(checkpoint, args.out, merge=args.merge, base=args.base,
                                             overwrite=args.overwrite)
        if error is not None:
            print(f"merge error: max |merged - adapted| logit difference {error:.3g}")
    elif args.merge or args.base:
        parser.error("--merge and --base apply to LoRA/QLoRA checkpoints only, and this one holds a whole model")
    else:
        path = export_checkpoint(checkpoint, args.out, overwrite=args.overwrite)
    print(f"exported to {path}")


def main(argv: list[str] | None = None) -> None:
    """Run a command; an error ends it with its message (which names the bad value and the fix) and
    exit status 1, without a traceback unless `$LIGHTNING_LLM_TRACEBACK` is set to 1."""
    command_line = sys.argv[1:] if argv is None else argv
    try:
        if command_line and command_line[0] in TOOL_COMMANDS:
            {"plan": plan, "generate": generate, "export": export}[command_line[0]](command_line[1:])
        else:
            run_trainer_cli(argv)  # None: LightningCLI reads sys.argv itself
    except Exception as err:
        if os.environ.get(TRACEBACK_ENV, "0") not in ("", "0"):
            raise
        print(f"lightning-llm: error: {err or type(err).__name__}\n"
              f"({TRACEBACK_ENV}=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()

