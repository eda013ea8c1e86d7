"""One call into lm-eval's `simple_evaluate`, for every evaluation the project runs.

lm-eval records the git commit of the working directory in its results (`git_hash`) by running
`git describe` with git's stderr going to the terminal, so outside a repository every evaluation printed
"fatal: not a git repository". lm-eval has no option to skip it; during the call its helper is replaced by
lm-eval's own file-reading fallback (`get_commit_from_path` on the working directory), which records the
same commit without starting git, and None outside a repository.

On several ranks lm-eval gives rank r the documents r, r + world_size, ... and builds their prompts there,
drawing the few-shot examples of each from one random generator per task (seeded alike on every rank) in
the order of that rank's documents only. A task that samples its few-shot examples (ARC, GSM8K: lm-eval's
default sampler) then showed each question other examples than on one process, and its score depended on
the number of ranks (ARC-Challenge 2-shot, 23 questions: acc 0.435 on 2 ranks, 0.348 on one, same weights).
During the call every rank builds the prompts of all documents, as one process does, and keeps its share.

A rank with fewer requests than another runs its last request again until the counts match (lm-eval's padding
for lockstep collectives), and lm-eval appends those answers to that request's: its document then had more
answers than `repeats`. Filters that read every answer (HumanEval's sandbox, which counts n in pass@k over all of
them; majority votes) scored it on more samples than asked for, and on other samples than one process. Each
request keeps its first `repeats` answers, the ones it asked for, before the filters run.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any

import lm_eval
from lm_eval import evaluator
from lm_eval.api.task import ConfigurableTask, Task
from lm_eval.loggers.utils import get_commit_from_path


def working_directory_commit() -> str | None:
    """The commit checked out in the working directory, read from its `.git` (None when there is none)."""
    return get_commit_from_path(os.getcwd())


def simple_evaluate(lm: Any, **kwargs: Any) -> dict[str, Any] | None:
    """`lm_eval.simple_evaluate(lm, **kwargs)`, without starting git, with one process's prompts and answers on
    every rank (see the module docstring)."""
    shelling_out = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = working_directory_commit
    try:
        with _requests_as_on_one_process():
            return lm_eval.simple_evaluate(lm, **kwargs)
    finally:
        evaluator.get_git_commit_hash = shelling_out


@contextlib.contextmanager
def _requests_as_on_one_process() -> Iterator[None]:
    build = Task.build_all_requests

    @functools.wraps(build)
    def build_all_requests(task: Task, *, rank: int = 0, world_size: int = 1, **kwargs: Any) -> None:
        build(task, rank=0, world_size=1, **kwargs)
        if world_size == 1:
            return
        documents = len({instance.doc_id for instance in task._instances})
        if documents < world_size:  # every rank knows it: all raise, none waits for the others
            raise ValueError(f"task {task.config.task!r}: {documents} document(s) for {world_size} ranks leave a rank "
                             f"none; evaluate at least {world_size} (limit) or on fewer ranks")
        # The documents lm-eval's own split gives this rank (`islice(docs, rank, limit, world_size)`).
        task._instances = [instance for instance in task._instances if instance.doc_id % world_size == rank]

    def keeping_asked_answers(apply_filters: Any) -> Any:
        @functools.wraps(apply_filters)
        def wrapped(task: Task) -> Any:
            for instance in task._instances:
                if instance.repeats:
                    del instance.resps[instance.repeats:]
            return apply_filters(task)

        return wrapped

    filters = {cls: cls.__dict__["apply_filters"] for cls in (Task, ConfigurableTask)}
    Task.build_all_requests = build_all_requests
    for cls, apply_filters in filters.items():
        cls.apply_filters = keeping_asked_answers(apply_filters)
    try:
        yield
    finally:
        Task.build_all_requests = build
        for cls, apply_filters in filters.items():
            cls.apply_filters = apply_filters
