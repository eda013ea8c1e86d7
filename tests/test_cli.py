"""The `lightning-llm` command: fit from YAML, generate, export, plan, and config errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from lightning_llm.cli import main
from lightning_llm.export import load_checkpoint, model_from_checkpoint

REPOSITORY = Path(__file__).parent.parent


def tiny_config(tmp_path, corpus_dir):
    return {
        "seed_everything": 0,
        "model": {"class_path": "lightning_llm.PretrainModule", "init_args": {"model": "tiny", "warmup_steps": 2}},
        "data": {"class_path": "lightning_llm.PretrainDataModule",
                 "init_args": {"sources": str(corpus_dir), "vocab_size": 300, "block_size": 32, "batch_size": 4,
                               "cache_dir": str(tmp_path / "cache")}},
        "trainer": {"accelerator": "cpu", "max_steps": 4, "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path), "limit_val_batches": 2, "num_sanity_val_steps": 0,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}},
                                  {"class_path": "lightning_llm.ThroughputCallback", "init_args": {"window": 2}}]},
        "export_dir": str(tmp_path / "hf"),
    }


def test_fit_generate_export_from_yaml(tmp_path, corpus_dir, capsys, caplog):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path, corpus_dir)))
    main(["fit", "--config", str(config)])
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.exists() and (tmp_path / "hf" / "model.safetensors").exists()
    printed = caplog.text  # the run summary names what the run wrote
    assert f"checkpoint (last)  {last}\n" in printed and f"export             {tmp_path / 'hf'}\n" in printed
    # the export written after fit and a later `export` of the checkpoint hold the same model
    main(["export", "--checkpoint", str(last), "--out", str(tmp_path / "hf2")])
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "hf2")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    capsys.readouterr()
    main(["generate", "--checkpoint", str(last), "--prompt", "def ", "--max_new_tokens", "8", "--temperature", "0"])
    greedy = capsys.readouterr().out.rstrip("\n")
    model = model_from_checkpoint(load_checkpoint(last))
    assert greedy.startswith("def ") and len(greedy) > len("def ")  # the prompt, then new tokens
    main(["generate", "--checkpoint", str(tmp_path / "hf"), "--prompt", "def ", "--max_new_tokens", "8", "--temperature", "0"])
    assert capsys.readouterr().out.rstrip("\n") == greedy  # checkpoint and export generate the same text
    assert model.config.vocab_size == 300


def test_export_overwrite_never_replaces_the_run_folder_it_reads_from(tmp_path, tokenizer, capsys):
    # `export --checkpoint RUN/checkpoints/last.ckpt --out RUN --overwrite` (RUN meant as the parent of the
    # export) would delete the checkpoint and the logs with the folder: refused, and everything is kept.
    from test_checkpoint_faults import _write_checkpoint

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "lightning_logs").mkdir()
    _write_checkpoint(run / "checkpoints" / "last.ckpt", tokenizer, seed=0)
    for out in (run, tmp_path):  # the run folder, and a folder above it
        with pytest.raises(SystemExit):
            main(["export", "--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--out", str(out), "--overwrite"])
        assert "overwrite replaces an earlier export" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "lightning_logs"]
    assert (run / "checkpoints" / "last.ckpt").exists()
    main(["export", "--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--out", str(run / "hf")])
    main(["export", "--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--out", str(run / "hf"), "--overwrite"])
    assert (run / "hf" / "config.json").exists()  # an earlier export is replaced as before


def test_generate_continues_every_prompt_given_and_refuses_bad_values_before_loading(tmp_path, tokenizer, capsys):
    from test_checkpoint_faults import _write_checkpoint

    checkpoint = str(tmp_path / "last.ckpt")
    _write_checkpoint(tmp_path / "last.ckpt", tokenizer, seed=0)
    sampled = ["--max_new_tokens", "6", "--temperature", "1.0", "--seed", "3"]
    alone = []
    for prompt in ("def ", "class "):  # the oracle: each prompt on its own
        main(["generate", "--checkpoint", checkpoint, "--prompt", prompt, *sampled])
        alone.append(capsys.readouterr().out)
    assert alone[0].startswith("def ") and alone[1].startswith("class ")
    main(["generate", "--checkpoint", checkpoint, "--prompt", "def ", "--prompt", "class ", *sampled])
    # in order, with a line of dashes between them (before, only the last --prompt was continued)
    assert capsys.readouterr().out == alone[0] + "-" * 40 + "\n" + alone[1]
    # Refused before any model is loaded (the checkpoint named does not exist), naming the option.
    for option, value in (("--temperature", "-1"), ("--max_new_tokens", "0"), ("--top_k", "-1")):
        with pytest.raises(SystemExit) as exit_info:
            main(["generate", "--checkpoint", str(tmp_path / "missing.ckpt"), "--prompt", "def ", option, value])
        assert exit_info.value.code == 2, option
        err = capsys.readouterr().err
        assert option in err and value in err and "missing.ckpt" not in err, err


def test_generate_past_the_models_window_is_refused_naming_what_fits(tmp_path, tokenizer, capsys):
    # Before, the model went on past its window (rotary positions it never trained on), silently.
    from lightning_llm.cli import inference_model
    from test_checkpoint_faults import _write_checkpoint

    checkpoint = str(tmp_path / "last.ckpt")
    _write_checkpoint(tmp_path / "last.ckpt", tokenizer, seed=0)
    window = inference_model(checkpoint)[0].config.max_position_embeddings
    prompt = "x = 1\n" * window  # longer than the window: trimmed below to a known length
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][: window - 3]
    prompt = tokenizer.decode(ids)
    length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert length < window
    with pytest.raises(SystemExit) as exit_info:  # the second prompt does not fit; nothing is generated for the first
        main(["generate", "--checkpoint", checkpoint, "--prompt", "def ", "--prompt", prompt,
              "--max_new_tokens", str(window - length + 1)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (f"--prompt #2 is {length} tokens and --max_new_tokens {window - length + 1} more would pass the model's "
            f"window of {window} tokens" in captured.err and f"--max_new_tokens {window - length} at most" in captured.err)
    # exactly up to the window is allowed
    main(["generate", "--checkpoint", checkpoint, "--prompt", prompt, "--max_new_tokens", str(window - length),
          "--temperature", "0"])
    assert capsys.readouterr().out.startswith(prompt[:20])


def test_a_device_this_machine_lacks_is_refused_before_the_model_loads(tmp_path, capsys):
    # Before: the model loaded, then torch failed with "Torch not compiled with CUDA enabled" (or an
    # invalid device ordinal), naming no option. (cuda:99: no machine this runs on has 100 GPUs.)
    for device in ("cuda:99", "gpu0"):
        with pytest.raises(SystemExit):
            main(["chat", "--model", str(tmp_path / "missing.ckpt"), "--device", device])
        err = capsys.readouterr().err
        assert f"--device {device}: not a device of this machine" in err and "missing.ckpt" not in err, err


def test_unknown_config_key_is_rejected(tmp_path, corpus_dir, capsys):
    config = tiny_config(tmp_path, corpus_dir)
    config["model"]["init_args"]["learning_rate"] = 1e-3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path)])
    assert exit_info.value.code != 0
    assert "learning_rate" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


def test_plan_prints_the_compute_optimal_model(capsys, tmp_path):
    main(["plan", "--compute", "5.76e23", "--plot", str(tmp_path / "plan.png")])
    out = capsys.readouterr().out
    assert "params   N = 6.700e+10" in out and (tmp_path / "plan.png").stat().st_size > 1000
    assert "note:" not in out  # Gopher's budget: a row of the paper's Table 3
    with pytest.raises(SystemExit):
        main(["plan", "--params", "-5"])


@pytest.mark.parametrize("args", [["--compute", "1e10"], ["--params", "1e3"], ["--compute", "1e29"], ["--params", "1e8"]])
def test_plan_says_when_it_extrapolates_beyond_the_papers_table(capsys, args):
    # Table 3 of Hoffmann et al. spans 1.92e19 (400M parameters) to 1.30e28 FLOPs (10T); 1e10 FLOPs planned a
    # 9,406-parameter model without a word
    main(["plan", *args])
    assert "outside the paper's Table 3 (1.92e+19 to 1.3e+28 FLOPs" in capsys.readouterr().out
    main(["plan", "--params", "1e9"])  # Table 3's 1B row
    assert "note:" not in capsys.readouterr().out


# What a user can type, written out here rather than read from the CLI.
EVERY_COMMAND = ("fit", "validate", "test", "predict", "plan", "generate", "export", "evaluate", "chat", "report")


def test_help_lists_every_command_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert set(listed) == set(EVERY_COMMAND)
    for command in EVERY_COMMAND:  # each one listed is one that runs: its own --help answers
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0, command
        usage = capsys.readouterr().out.split("\n\n")[0]
        assert usage.startswith("usage: ") and f" {command}" in usage, command


def test_unknown_command_names_the_close_one(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["exprot", "--checkpoint", "x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown command 'exprot'; did you mean 'export'?" in err and "lightning-llm --help" in err


def test_plan_imports_neither_lightning_nor_transformers(tmp_path):
    code = ("import sys; from lightning_llm.cli import main; main(['plan', '--params', '7e9']); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'transformers', 'torch'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(REPOSITORY)})
    *plan, imported = result.stdout.splitlines()
    assert imported == "[]" and "params   N = 7.000e+09" in plan
