"""Short strategy names in Lightning's StrategyRegistry: Trainer(strategy="zero3"), `strategy: zero3` in YAML."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

from lightning_llm.strategies.parallel import PipelineStrategy
from lightning_llm.strategies.zero import ZeROStrategy


@pytest.mark.parametrize("name, stage", [("zero1", 1), ("zero2", 2), ("zero3", 3)])
def test_trainer_picks_zero_with_the_stage(name, stage):
    strategy = Trainer(strategy=name, accelerator="cpu", devices=1, logger=False).strategy
    assert type(strategy) is ZeROStrategy and strategy.stage == stage


def test_pipeline_name_and_unknown_name():
    strategy = Trainer(strategy="pipeline", accelerator="cpu", devices=2, logger=False).strategy
    defaults = PipelineStrategy()  # the name means the class's defaults
    assert type(strategy) is PipelineStrategy
    assert (strategy.stages, strategy.microbatches, strategy.schedule) == (defaults.stages, defaults.microbatches, defaults.schedule)
    with pytest.raises(ValueError, match=r"invalid strategy name: `strategy='zero4'`"):
        Trainer(strategy="zero4", accelerator="cpu", devices=1)


def test_yaml_strategy_name(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("trainer:\n  strategy: zero3\n  accelerator: cpu\n  devices: 1\n  logger: false\n")
    cli = LightningCLI(BoringModel, BoringDataModule, run=False, args=["--config", str(config)])
    assert type(cli.trainer.strategy) is ZeROStrategy and cli.trainer.strategy.stage == 3


def test_names_registered_whichever_is_imported_first():
    """`import lightning_llm` imports no Lightning; the names appear when Lightning loads later."""
    code = (
        "import sys, lightning_llm\n"
        "assert 'lightning' not in sys.modules and 'transformers' not in sys.modules, 'import lightning_llm is not cheap'\n"
        "from lightning.pytorch import Trainer\n"
        "s = Trainer(strategy='zero2', accelerator='cpu', devices=1, logger=False).strategy\n"
        "print(type(s).__name__, s.stage)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "ZeROStrategy 2"


def test_a_name_another_package_registered_is_left_to_it_with_a_warning():
    from lightning.fabric.strategies.registry import _StrategyRegistry
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_llm.strategies.names import register_strategies

    registry = _StrategyRegistry()
    registry.register("zero3", DDPStrategy, description="someone else's")
    with pytest.warns(UserWarning, match="'zero3' is already registered by .*DDPStrategy"):
        register_strategies(registry)
    assert registry["zero3"]["strategy"] is DDPStrategy and type(registry.get("zero1")) is ZeROStrategy
    register_strategies(registry)  # again, as a second import would: its own names are replaced, no error
    assert registry.get("zero2").stage == 2
