"""One call into lm-eval's `simple_evaluate`, for every evaluation the project runs.

lm-eval records the git commit of the working directory in its results (`git_hash`) by running
`git describe` with git's stderr going to the terminal, so outside a repository every evaluation printed
"fatal: not a git repository". lm-eval has no option to skip it; during the call its helper is replaced by
lm-eval's own file-reading fallback (`get_commit_from_path` on the working directory), which records the
same commit without starting git, and None outside a repository.
"""

from __future__ import annotations

import os
from typing import Any

import lm_eval
from lm_eval import evaluator
from lm_eval.loggers.utils import get_commit_from_path


def working_directory_commit() -> str | None:
    """The commit checked out in the working directory, read from its `.git` (None when there is none)."""
    return get_commit_from_path(os.getcwd())


def simple_evaluate(lm: Any, **kwargs: Any) -> dict[str, Any] | None:
    """`lm_eval.simple_evaluate(lm, **kwargs)`, without starting git (see the module docstring)."""
    shelling_out = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = working_directory_commit
    try:
        return lm_eval.simple_evaluate(lm, **kwargs)
    finally:
        evaluator.get_git_commit_hash = shelling_out
