"""Short strategy names in Lightning's `StrategyRegistry`: `Trainer(strategy="zero3")`, `strategy: zero3` in YAML.

Lightning fills its registry when `lightning.pytorch.strategies` is imported, from its own classes'
`register_strategies`. `import lightning_llm` must stay cheap (it imports neither Lightning nor
transformers), so the names are added when that module is loaded: at once if it already is, else by a
one-shot import hook that runs right after it. Each name's factory imports its strategy class only
when a Trainer asks for it: the hook runs in the middle of `import lightning.pytorch`, where
`lightning_llm.strategies.zero` (which imports `lightning.pytorch.Trainer`) cannot be imported yet.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any, Callable

LIGHTNING_STRATEGIES = "lightning.pytorch.strategies"

# name -> (module, class, constructor arguments, description)
NAMES: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "zero1": ("lightning_llm.strategies.zero", "ZeROStrategy", {"stage": 1}, "ZeRO stage 1: optimizer state sharded"),
    "zero2": ("lightning_llm.strategies.zero", "ZeROStrategy", {"stage": 2}, "ZeRO stage 2: + gradients sharded"),
    "zero3": ("lightning_llm.strategies.zero", "ZeROStrategy", {"stage": 3}, "ZeRO stage 3: + parameters sharded"),
    "pipeline": ("lightning_llm.strategies.parallel", "PipelineStrategy", {},
                 "pipeline parallelism: 2 stages, 4 micro-batches, 1F1B"),
    "parallel": ("lightning_llm.strategies.parallel", "ParallelStrategy", {},
                 "one device mesh: pipeline x data parallel (ZeRO-3) x tensor parallel; degrees as init_args"),
}


def _factory(module: str, name: str) -> Callable[..., Any]:
    def build(**init_args: Any) -> Any:
        return getattr(importlib.import_module(module), name)(**init_args)

    build.lightning_llm = True  # marks the entries this module owns (registering twice replaces only those)
    return build


def register_strategies(registry: Any) -> None:
    """Add the short names to `registry` (Lightning's `StrategyRegistry`). A name another package already
    registered is left to it, with a warning: `strategy="zero3"` would silently mean something else otherwise."""
    for name, (module, cls, init_args, description) in NAMES.items():
        owner = registry[name]["strategy"] if name in registry else None
        if owner is not None and not getattr(owner, "lightning_llm", False):
            warnings.warn(f"strategy name {name!r} is already registered by {owner!r}; lightning-llm's {cls}"
                          f"({init_args}) is not registered under it: pass {cls}(...) to the Trainer instead")
            continue
        registry.register(name, _factory(module, cls), description=description, override=True, **init_args)


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `target` with the other finders and runs `callback(module)` right after the module executes, once."""

    def __init__(self, target: str, callback: Callable[[ModuleType], None]) -> None:
        self.target, self.callback, self.loader = target, callback, None

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.target:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # the module keeps its own loader afterwards
        self.loader.exec_module(module)
        self.callback(module)


def register_with_lightning() -> None:
    """Register the names in Lightning's `StrategyRegistry` now if Lightning is loaded, else when it loads."""
    module = sys.modules.get(LIGHTNING_STRATEGIES)
    if module is not None:
        register_strategies(module.StrategyRegistry)
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(LIGHTNING_STRATEGIES, lambda m: register_strategies(m.StrategyRegistry)))
