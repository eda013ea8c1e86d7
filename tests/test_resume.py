"""`lightning-llm fit --ckpt_path`: what the user typed wins over the checkpoint's hyper-parameters (and
what differs is printed); another architecture or another data order is an error naming the values."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml
from test_cli import tiny_config

from lightning_llm.cli import main
from lightning_llm.data.pretrain import PretrainDataModule
from lightning_llm.export import load_checkpoint
from lightning_llm.modules.pretrain import warmup_cosine

BASE_LR = 3e-3


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus_dir):
    """A 4-step run whose last checkpoint the tests resume from."""
    tmp = tmp_path_factory.mktemp("base")
    config = tiny_config(tmp, corpus_dir)
    config["model"]["init_args"]["lr"] = BASE_LR
    (tmp / "run.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(tmp / "run.yaml")])
    return tmp / "ckpt" / "last.ckpt", config


def resume_config(tmp_path, base_config, corpus_dir, **model_args) -> str:
    """The base run's config with its own output folders, the model options given, and 6 steps."""
    config = tiny_config(tmp_path, corpus_dir)
    config["data"]["init_args"]["cache_dir"] = base_config["data"]["init_args"]["cache_dir"]  # (the same tokenizer)
    config["model"]["init_args"].update(model_args)
    config["trainer"]["max_steps"] = 6
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_the_command_line_wins_over_the_checkpoint_and_the_changes_are_printed(tmp_path, base_run, corpus_dir, caplog):
    checkpoint, base = base_run
    config = resume_config(tmp_path, base, corpus_dir, lr=BASE_LR)
    with caplog.at_level(logging.INFO):
        main(["fit", "--config", config, "--ckpt_path", str(checkpoint), "--model.lr=1e-5", "--model.weight_decay=0.05"])
    table = caplog.text[caplog.text.index("resuming from"):].splitlines()
    assert "these options differ" in table[0]
    assert ["lr", repr(BASE_LR), "1e-05"] in [line.split() for line in table]
    assert ["weight_decay", "0.1", "0.05"] in [line.split() for line in table]
    resumed = load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert resumed["global_step"] == 6 and resumed["hyper_parameters"]["lr"] == 1e-5
    # The optimizer ran on the new peak rate, at the schedule's step (the oracle: the schedule itself),
    # and with the new weight decay on the weight matrices (none on norms and embeddings).
    (schedule,) = resumed["lr_schedulers"]
    assert schedule["base_lrs"] == [1e-5, 1e-5]
    expected = 1e-5 * warmup_cosine(6, warmup_steps=2, max_steps=6, min_lr_ratio=0.1)
    decay, no_decay = resumed["optimizer_states"][0]["param_groups"]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    for group in (decay, no_decay):
        assert group["lr"] == pytest.approx(expected, rel=1e-12) and group["initial_lr"] == 1e-5


def test_options_the_user_did_not_give_come_from_the_checkpoint(tmp_path, base_run, corpus_dir, caplog):
    checkpoint, base = base_run
    config = resume_config(tmp_path, base, corpus_dir)  # no lr: the default would be 3e-4
    with caplog.at_level(logging.INFO):
        main(["fit", "--config", config, "--ckpt_path", str(checkpoint)])
    assert "the module's options equal the checkpoint's" in caplog.text
    assert load_checkpoint(tmp_path / "ckpt" / "last.ckpt")["hyper_parameters"]["lr"] == BASE_LR


def test_another_architecture_is_an_error_naming_both(tmp_path, base_run, corpus_dir, capsys):
    checkpoint, base = base_run
    config = resume_config(tmp_path, base, corpus_dir)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", config, "--ckpt_path", str(checkpoint), "--model.model=llama-5m"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "trained with model='tiny' (hidden_size 64" in err and "asks for model='llama-5m' (hidden_size 256" in err
    assert not (tmp_path / "ckpt").exists()


def test_a_changed_data_order_is_an_error_unless_accepted(tmp_path, base_run, corpus_dir, capsys):
    checkpoint, base = base_run
    config = resume_config(tmp_path, base, corpus_dir)
    with pytest.raises(SystemExit):
        main(["fit", "--config", config, "--ckpt_path", str(checkpoint), "--data.block_size=16", "--data.batch_size=2"])
    err = capsys.readouterr().err
    assert "block_size 32 -> 16; batch_size 4 -> 2" in err and "--data.allow_data_change=true" in err
    assert not (tmp_path / "ckpt").exists()
    main(["fit", "--config", config, "--ckpt_path", str(checkpoint), "--data.block_size=16",
          "--data.allow_data_change=true"])
    assert load_checkpoint(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 6


def test_max_steps_below_the_checkpoints_step_is_an_error(tmp_path, base_run, corpus_dir, capsys):
    # It trained nothing, and the export and run summary read as if this run had trained the checkpoint's model.
    checkpoint, base = base_run
    step = load_checkpoint(checkpoint)["global_step"]
    config = resume_config(tmp_path, base, corpus_dir)
    with pytest.raises(SystemExit):
        main(["fit", "--config", config, "--ckpt_path", str(checkpoint), f"--trainer.max_steps={step - 1}"])
    err = capsys.readouterr().err
    assert f"max_steps={step - 1} is below the step {checkpoint} is at ({step})" in err
    assert f"--trainer.max_steps > {step}" in err
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "hf").exists()


def test_ckpt_path_last_starts_fresh_then_resumes_with_every_check(tmp_path, corpus_dir, capsys, caplog):
    # `ckpt_path: last` (Lightning's name for the newest last checkpoint of the run's ModelCheckpoint) is how a
    # requeued job resumes; it was read as a file named 'last' ("checkpoint 'last' does not exist").
    config = tiny_config(tmp_path, corpus_dir)
    config["trainer"]["max_steps"] = 2
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    run = ["fit", "--config", str(path), "--ckpt_path", "last", "--export_overwrite=true"]
    main(run)  # nothing to resume yet: a fresh run
    assert load_checkpoint(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 2
    capsys.readouterr()
    for refused, message in ((["--trainer.max_steps=1"], "max_steps=1 is below the step"),
                             (["--trainer.max_steps=4", "--data.batch_size=2"], "data order differs from this run's: batch_size 4 -> 2")):
        with pytest.raises(SystemExit):
            main([*run, *refused])
        assert message in capsys.readouterr().err, refused
    with caplog.at_level(logging.INFO):
        main([*run, "--trainer.max_steps=4", "--model.lr=1e-4"])
    assert f"resuming from {tmp_path / 'ckpt' / 'last.ckpt'} (ckpt_path 'last'): these options differ" in caplog.text
    resumed = load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert resumed["global_step"] == 4 and resumed["hyper_parameters"]["lr"] == 1e-4


def test_an_unreadable_checkpoint_is_an_error_naming_it(tmp_path, base_run, corpus_dir, capsys):
    checkpoint, base = base_run
    config = resume_config(tmp_path, base, corpus_dir)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[:4096])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy().tobytes())
    for path in (truncated, garbage, tmp_path / "missing.ckpt"):
        with pytest.raises(SystemExit):
            main(["fit", "--config", config, "--ckpt_path", str(path)])
        err = capsys.readouterr().err
        assert f"checkpoint '{path}'" in err and "weights_only" not in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 2  # the message, and how to see the traceback
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(garbage), "--out", str(tmp_path / "hf")])
    assert f"checkpoint '{garbage}' cannot be read" in capsys.readouterr().err


def test_the_data_parallel_size_is_part_of_the_data_order(corpus_dir, tmp_path):
    data = PretrainDataModule(str(corpus_dir), block_size=32, batch_size=4, cache_dir=str(tmp_path))
    saved = data.data_order(data_parallel_size=2)
    data.check_data_order(saved, data_parallel_size=2)  # the same: accepted
    with pytest.raises(ValueError, match=r"data-parallel size 2 -> 1\..*allow_data_change=True"):
        data.check_data_order(saved, data_parallel_size=1)
    more = PretrainDataModule([str(corpus_dir), {"path": str(corpus_dir / "heapq.py"), "weight": 0.5}], block_size=32, batch_size=4)
    with pytest.raises(ValueError, match=r"sources \[\{'path': '.*'\}\] -> \[\{.*\}, \{'path': '.*heapq.py', 'weight': 0.5"):
        more.check_data_order(saved)
