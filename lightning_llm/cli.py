"""The `lightning-llm` command: LightningCLI's fit/validate/test/predict, plus plan, generate, export,
evaluate, chat and report.

    lightning-llm fit --config examples/pretrain_tiny.yaml
    lightning-llm generate --checkpoint runs/tiny/checkpoints/last.ckpt --prompt "def "
    lightning-llm export --checkpoint runs/tiny/checkpoints/last.ckpt --out runs/tiny/hf
    lightning-llm plan --compute 5.76e23 --plot plan.png
    lightning-llm evaluate --model runs/tiny/hf --tasks arc_easy,hellaswag --limit 100 --output_path runs/tiny/eval
    lightning-llm chat --model runs/sft_tiny/hf
    lightning-llm report runs/tiny

Each command imports what it needs when it runs: `lightning-llm --help` and `plan` import neither
Lightning nor transformers. An error prints as one or two lines with the fix;
LIGHTNING_LLM_TRACEBACK=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TRACEBACK_ENV = "LIGHTNING_LLM_TRACEBACK"

# Every command with its line in `lightning-llm --help` (also its own --help's description).
TRAINER_COMMANDS = {
    "fit": "train a model from a YAML config: lightning-llm fit --config examples/pretrain_tiny.yaml",
    "validate": "run the validation loop of a config (and its benchmark callbacks) on a checkpoint (--ckpt_path)",
    "test": "run the test loop, for a LightningModule of your own that defines test_step",
    "predict": "run the predict loop, for a LightningModule of your own that defines predict_step",
}
TOOL_COMMANDS = {
    "plan": "Chinchilla compute-optimal model size and tokens for a FLOP budget (or the budget for a size)",
    "generate": "continue a prompt with a checkpoint or an export",
    "export": "write a checkpoint as a Hugging Face model directory (from_pretrained loads it)",
    "evaluate": "run lm-eval tasks on an export, a checkpoint or a hub model; write lm-eval's results JSON",
    "chat": "talk with a model in the terminal, with its chat template; the answer streams as it is generated",
    "report": "plots (loss, learning rate, tokens/s, MFU, benchmarks) and a markdown summary of a run's metrics.csv",
}


def command_parser(command: str) -> argparse.ArgumentParser:
    """The argument parser of one of the `TOOL_COMMANDS`, described by its line there."""
    return argparse.ArgumentParser(prog=f"lightning-llm {command}", description=TOOL_COMMANDS[command])


def overview() -> str:
    """`lightning-llm --help`: every command with one line."""
    width = max(map(len, {**TRAINER_COMMANDS, **TOOL_COMMANDS}))
    lines = ["usage: lightning-llm COMMAND [options]   (lightning-llm COMMAND --help for its options)", "",
             "Lightning's commands (LightningCLI; options from a YAML config and the command line):"]
    lines += [f"  {name:<{width}}  {text}" for name, text in TRAINER_COMMANDS.items()]
    lines += ["", "Tools:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in TOOL_COMMANDS.items()]
    return "\n".join(lines)


def plan(argv: list[str]) -> None:
    from lightning_llm.scaling import CHINCHILLA_TABLE_3_FLOPS, chinchilla_plan, plot_plan

    parser = command_parser("plan")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--compute", type=float, help="training budget in FLOPs, e.g. 5.76e23")
    group.add_argument("--params", type=float, help="model size in parameters, e.g. 67e9 (a mixture of experts: the "
                       "active parameters per token, which C = 6 N D counts; the fit itself is on dense models)")
    parser.add_argument("--plot", help="write the plan as a PNG here")
    args = parser.parse_args(argv)
    try:
        result = chinchilla_plan(compute=args.compute, params=args.params)
    except ValueError as err:
        parser.error(str(err))
    print(f"compute  C = {result.compute:.3e} FLOPs")
    print(f"params   N = {result.params:.3e}")
    print(f"tokens   D = {result.tokens:.3e}  ({result.tokens_per_param:.1f} tokens per parameter)")
    if result.outside_table_3:
        low, high = CHINCHILLA_TABLE_3_FLOPS
        print(f"note: C = {result.compute:.3g} FLOPs is outside the paper's Table 3 ({low:.3g} to {high:.3g} FLOPs, "
              "400M to 10T parameters): this plan extrapolates the power-law fit beyond it")
    if args.plot:
        plot_plan(result, args.plot)
        print(f"plot written to {args.plot}")


# A hub id: "name" or "org/name" (no file suffix); anything else that does not exist is a missing local path.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")


def inference_model(path: str) -> tuple[Any, Any]:
    """The model and tokenizer `generate`, `evaluate` and `chat` use: an export directory, a checkpoint
    (a file or a sharded directory), a LoRA/QLoRA run's adapter checkpoint rebuilt on its base, or a
    hub id (online, or in the local hub cache). A model with an inf or NaN weight is refused: its
    samples would fail in the sampler, its greedy output and its scores would be silently wrong."""
    from lightning_llm.export import check_finite

    model, tokenizer = _inference_model(path)
    check_finite(model.state_dict(), path, action="use")
    return model, tokenizer


def _inference_model(path: str) -> tuple[Any, Any]:
    from lightning_llm.export import is_adapter_checkpoint, load_checkpoint, load_for_inference, tokenizer_from_checkpoint

    local = Path(path)
    if (local / "config.json").exists():
        return load_for_inference(local)
    if not local.exists() and HUB_ID.fullmatch(path) and local.suffix not in CHECKPOINT_SUFFIXES:
        return hub_model(path)
    source = load_checkpoint(path)
    if is_adapter_checkpoint(source):
        # (imported only here: it imports peft and bitsandbytes)
        from lightning_llm.callbacks.lora import peft_model_from_checkpoint

        return peft_model_from_checkpoint(source), tokenizer_from_checkpoint(source)
    return load_for_inference(source)


def hub_model(model_id: str) -> tuple[Any, Any]:
    """A model and its tokenizer from the Hugging Face hub (or its local cache)."""
    from transformers import AutoModelForCausalLM

    from lightning_llm.data.tokenizer import load_tokenizer

    try:
        return AutoModelForCausalLM.from_pretrained(model_id).eval(), load_tokenizer(model_id)
    except OSError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"{model_id!r} is neither a local export directory or checkpoint nor a hub model that can be loaded "
            f"({reason}). Give an export directory (lightning-llm export --out DIR), a checkpoint file or sharded "
            "checkpoint directory (write a relative one as ./NAME), or a hub id that is cached or reachable online"
        ) from None


def generate(argv: list[str]) -> None:
    import torch

    parser = command_parser("generate")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint file or a Hugging Face export directory")
    parser.add_argument("--prompt", action="append", default=None,
                        help="the text to continue (default: empty); repeat it for several prompts, each continued "
                             "from --seed as if alone and printed in order, separated by a line of dashes")
    parser.add_argument("--max_new_tokens", type=positive_count, default=128)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    parser.add_argument("--top_k", type=natural_count, default=50, help="sample from the k likeliest tokens (0: from all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.temperature >= 0:
        parser.error(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    model, tokenizer = inference_model(args.checkpoint)
    if tokenizer is None:
        parser.error(f"{args.checkpoint} carries no tokenizer")
    sample = args.temperature > 0
    prompts = [tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"] for prompt in args.prompt or [""]]
    prompts = [ids if ids.numel() else torch.tensor([[tokenizer.eos_token_id]]) for ids in prompts]
    # Past its window a model sees positions it never trained on (rotary embeddings extrapolate without a
    # word): refused before anything is generated, naming the prompt and the longest that fits.
    window = getattr(model.config, "max_position_embeddings", None)
    longest = max(range(len(prompts)), key=lambda i: prompts[i].shape[1])
    if window is not None and prompts[longest].shape[1] + args.max_new_tokens > window:
        length = prompts[longest].shape[1]
        fits = f"--max_new_tokens {window - length} at most" if length < window else "a prompt shorter than the window"
        parser.error(f"--prompt #{longest + 1} is {length} tokens and --max_new_tokens {args.max_new_tokens} more would "
                     f"pass the model's window of {window} tokens (positions it was never trained on): give {fits}")
    for i, ids in enumerate(prompts):
        if i:
            print(PROMPT_SEPARATOR)
        torch.manual_seed(args.seed)
        out = model.generate(
            ids, max_new_tokens=args.max_new_tokens, do_sample=sample, temperature=args.temperature if sample else None,
            top_k=args.top_k if sample else None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        print(tokenizer.decode(out[0], skip_special_tokens=True))


PROMPT_SEPARATOR = "-" * 40  # between the continuations of several --prompt


def export(argv: list[str]) -> None:
    from lightning_llm.export import (
        export_checkpoint,
        is_adapter_checkpoint,
        load_checkpoint,
    )

    parser = command_parser("export")
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


def positive_count(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text}")
    return value


def natural_count(text: str) -> int:
    """argparse type: an int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text}")
    return value


def limit_value(text: str) -> int | float:
    """argparse type of --limit: a count of documents (an int >= 1) or a fraction of them (0 < f < 1)."""
    from lightning_llm.eval import check_limit

    try:
        return check_limit(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a count (an int >= 1) or a fraction in (0, 1), got {text}") from None


def generation_settings(text: str) -> dict[str, Any]:
    """argparse type of --gen_kwargs: lm-eval's `key=value,key=value` (values read as lm-eval reads them), each
    with a value; max_gen_toks an int >= 1, temperature a number >= 0, do_sample true or false."""
    from lm_eval.utils import simple_parse_args_string

    settings = simple_parse_args_string(text)
    if not settings:
        raise argparse.ArgumentTypeError(f"names no setting: {text!r}; e.g. max_gen_toks=64,temperature=0")
    for key, value in settings.items():
        bad = (value == "" or (key == "max_gen_toks" and (type(value) is not int or value < 1))
               or (key == "temperature" and (type(value) not in (int, float) or not value >= 0))
               or (key == "do_sample" and type(value) is not bool))
        if bad:
            raise argparse.ArgumentTypeError(
                f"{key}={value!r} in {text!r}: write key=value pairs, comma-separated (max_gen_toks an int >= 1, "
                "temperature a number >= 0, do_sample true or false)")
    return settings


def evaluate(argv: list[str]) -> None:
    parser = command_parser("evaluate")
    parser.add_argument("--model", required=True,
                        help="an export directory, a checkpoint (file or sharded directory; a LoRA run's too) or a hub id")
    parser.add_argument("--tasks", required=True,
                        help="comma-separated lm-eval task, group or tag names, or paths of task YAMLs")
    parser.add_argument("--include_path", action="append", default=None,
                        help="a folder of task YAMLs in lm-eval's format, searched first (may be repeated)")
    parser.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples per prompt (default: each task's)")
    parser.add_argument("--limit", type=limit_value, default=None,
                        help="only the first N documents of each task (or a fraction < 1 of them)")
    parser.add_argument("--batch_size", type=positive_count, default=16, help="requests per forward pass")
    parser.add_argument("--output_path", default=None, help="write lm-eval's results JSON into this folder")
    parser.add_argument("--log_samples", action="store_true", help="put every prompt and output in the results JSON")
    parser.add_argument("--bootstrap_iters", type=int, default=100000,
                        help="resamples for the stderr of metrics that are not means (lm-eval's default; 0: none)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if there is one)")
    parser.add_argument("--gen_kwargs", type=generation_settings, default=None,
                        help="generation settings that replace the generative tasks' own, lm-eval's format: "
                             "max_gen_toks=64,temperature=0 (a model whose window is shorter than a task's length needs it)")
    parser.add_argument("--confirm_run_unsafe_code", action="store_true",
                        help="allow tasks that run generated code (humaneval runs it in lightning_llm.eval.sandbox; "
                             "other tasks as lm-eval does, unconfined)")
    args = parser.parse_args(argv)
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks:
        parser.error(f"--tasks names no task: {args.tasks!r}; give comma-separated names, e.g. --tasks arc_easy,hellaswag")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        parser.error(f"--num_fewshot must be >= 0, got {args.num_fewshot}")
    from lightning_llm.extras import require

    make_table = require("lm_eval.utils", "lightning-llm evaluate").make_table
    from lightning_llm.eval.harness import evaluate_model, prepare_tasks, results_file, write_results

    out = results_file(args.output_path) if args.output_path else None  # (a bad path fails before any work)
    specs, manager = prepare_tasks(tasks, args.include_path, args.confirm_run_unsafe_code)
    device = inference_device(args.device)
    model, tokenizer = inference_model(args.model)
    if tokenizer is None:
        parser.error(f"--model {args.model}: it carries no tokenizer; export it with one, or give a checkpoint of a run that had one")
    model.to(device)
    results = evaluate_model(model, tokenizer, specs, manager, num_fewshot=args.num_fewshot, limit=args.limit,
                             batch_size=args.batch_size, bootstrap_iters=args.bootstrap_iters,
                             log_samples=args.log_samples, confirm_run_unsafe_code=args.confirm_run_unsafe_code,
                             gen_kwargs=args.gen_kwargs)
    print(make_table(results) + (make_table(results, "groups") if results.get("groups") else ""))
    if out is not None:
        print(f"results written to {write_results(results, out)}")


def chat(argv: list[str]) -> None:
    parser = command_parser("chat")
    parser.add_argument("--model", required=True,
                        help="an export directory, a checkpoint (file or sharded directory; a LoRA run's too) or a hub id")
    parser.add_argument("--system", default=None, help="a system message that opens the conversation")
    parser.add_argument("--max_new_tokens", type=positive_count, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding")
    parser.add_argument("--top_k", type=positive_count, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if there is one)")
    args = parser.parse_args(argv)
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    import torch

    from lightning_llm import chat as conversation

    device = inference_device(args.device)
    model, tokenizer = inference_model(args.model)
    if tokenizer is None:
        parser.error(f"--model {args.model}: it carries no tokenizer; export it with one, or give a checkpoint of a run that had one")
    model.to(device)
    if not tokenizer.chat_template:
        print(f"lightning-llm chat: {args.model}'s tokenizer has no chat template; the conversation is a plain transcript "
              "(User: ... / Assistant: ...). A model tuned with lightning-llm's InstructionTuningModule has one",
              file=sys.stderr)
    interactive = sys.stdin.isatty()
    if interactive:
        print("one message per line; " + "; ".join(f"{c}: {what}" for c, what in conversation.COMMANDS.items()),
              file=sys.stderr)
    torch.manual_seed(args.seed)
    conversation.chat(model, tokenizer, user_turns(interactive), sys.stdout, system=args.system,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)


def report(argv: list[str]) -> None:
    parser = command_parser("report")
    parser.add_argument("run_dir", help="the run's folder (its trainer.default_root_dir), or its metrics.csv")
    parser.add_argument("--out", default=None, help="where to write the plots and report.md (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    from lightning_llm.report import write_report  # (matplotlib and numpy: only for this command)

    metrics, others, written = write_report(args.run_dir, args.out)
    print(f"metrics read from {metrics}")
    if others:
        print(f"  (the newest of {len(others) + 1} metrics.csv under {args.run_dir}; give a file to choose another: "
              + ", ".join(map(str, others[:3])) + (", ..." if len(others) > 3 else "") + ")")
    print("written:\n" + "\n".join(f"  {path}" for path in written))


def user_turns(interactive: bool) -> Iterator[str]:
    """Lines of standard input; a prompt on the terminal when it is one."""
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield line


def inference_device(device: str | None) -> Any:
    """`device`, or cuda when there is one, else cpu; a device that torch does not have here is an error
    naming it (before any model loads: the commands call this first)."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
        if chosen.type != "cpu":
            module = getattr(torch, chosen.type)
            count = module.device_count() if module.is_available() else 0
            if count <= (chosen.index or 0):
                raise ValueError(f"{count} {chosen.type} device(s) here")
    except (AttributeError, RuntimeError, ValueError) as err:
        raise ValueError(f"--device {device}: not a device of this machine ({err}); give cpu, or cuda / cuda:N "
                         "where torch sees a GPU") from None
    return chosen


def main(argv: list[str] | None = None) -> None:
    """Run a command; an error ends it with its message (which names the bad value and the fix) and
    exit status 1, without a traceback unless `$LIGHTNING_LLM_TRACEBACK` is set to 1."""
    command_line = sys.argv[1:] if argv is None else argv
    command = command_line[0] if command_line else None
    if command in (None, "-h", "--help"):
        print(overview(), file=sys.stdout if command else sys.stderr)
        raise SystemExit(0 if command else 2)
    if not (command in TRAINER_COMMANDS or command in TOOL_COMMANDS or command.startswith("-")):
        close = difflib.get_close_matches(command, [*TRAINER_COMMANDS, *TOOL_COMMANDS], n=1)
        print(f"lightning-llm: error: unknown command {command!r}" + (f"; did you mean {close[0]!r}?" if close else "")
              + f"\nThe commands: {', '.join([*TRAINER_COMMANDS, *TOOL_COMMANDS])} (lightning-llm --help describes each)",
              file=sys.stderr)
        raise SystemExit(2)
    try:
        if command in TOOL_COMMANDS:
            {"plan": plan, "generate": generate, "export": export, "evaluate": evaluate, "chat": chat,
             "report": report}[command](command_line[1:])
        else:
            from lightning_llm.lightning_cli import run_trainer_cli

            run_trainer_cli(argv)  # None: LightningCLI reads sys.argv itself
    except Exception as err:
        if os.environ.get(TRACEBACK_ENV, "0") not in ("", "0"):
            raise
        print(f"lightning-llm: error: {err or type(err).__name__}\n"
              f"({TRACEBACK_ENV}=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()

