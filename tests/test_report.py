"""The CLI's default loggers (TensorBoard and CSV in one folder, unless the config names a logger) and
`lightning-llm report`: plots and a summary of a run, checked against the run's metrics.csv."""

from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from test_cli import tiny_config

from lightning_llm.cli import main
from lightning_llm.data.pretrain import PretrainDataModule
from lightning_llm.lightning_cli import LLMCLI
from lightning_llm.modules.pretrain import PretrainModule

EXAMPLE = Path(__file__).parent.parent / "examples" / "pretrain_tiny.yaml"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def loggers(tmp_path, *args):
    cli = LLMCLI(PretrainModule, PretrainDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                 args=["--config", str(EXAMPLE), "--trainer.default_root_dir", str(tmp_path), *args])
    return cli.trainer.loggers


def test_tensorboard_and_csv_share_one_folder_unless_the_config_names_a_logger(tmp_path):
    comma, tensorboard = loggers(tmp_path / "a")
    assert isinstance(tensorboard, TensorBoardLogger) and isinstance(comma, CSVLogger)
    assert tensorboard.log_dir == comma.log_dir == str(tmp_path / "a" / "lightning_logs" / "version_0")
    (tmp_path / "a" / "lightning_logs" / "version_0").mkdir(parents=True)  # a first run: the next one is version_1
    assert {logger.log_dir for logger in loggers(tmp_path / "a")} == {str(tmp_path / "a" / "lightning_logs" / "version_1")}
    # what the user typed stays as typed
    (named,) = loggers(tmp_path / "b", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                       f"--trainer.logger.save_dir={tmp_path / 'b'}")
    assert type(named) is CSVLogger
    assert loggers(tmp_path / "c", "--trainer.logger=false") == []


@pytest.mark.filterwarnings("error:Experiment logs directory")  # (CSV's warning when TensorBoard wrote there first)
def test_report_of_a_cli_run_plots_and_summarises_its_metrics(tmp_path, corpus_dir, capsys, caplog):
    config = tiny_config(tmp_path, corpus_dir)
    del config["trainer"]["logger"]  # the default loggers
    config["trainer"].update(max_steps=6, val_check_interval=2, log_every_n_steps=1)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(tmp_path / "run.yaml")])
    logs = tmp_path / "lightning_logs" / "version_0"
    assert list(logs.glob("events.out.tfevents.*")) and (logs / "metrics.csv").exists()
    capsys.readouterr()

    main(["report", str(tmp_path)])
    printed = capsys.readouterr().out
    assert f"metrics read from {logs / 'metrics.csv'}" in printed
    out = tmp_path / "report"
    for name in ["loss_vs_step", "loss_vs_tokens", "learning_rate", "tokens_per_sec"]:
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        with Image.open(out / f"{name}.png") as image:
            image.verify()
    assert not (out / "mfu.png").exists()  # no MFU on a CPU (no known peak): no empty plot

    # the oracle: the lowest validation loss in metrics.csv, read here with the csv module
    with open(logs / "metrics.csv", newline="") as f:
        every = list(csv.DictReader(f))
    rows = [row for row in every if row["val/loss"]]
    assert len(rows) == 3  # validation at steps 2, 4 and 6
    lowest = min(rows, key=lambda row: float(row["val/loss"]))
    markdown = (out / "report.md").read_text()
    found = re.search(r"\| best validation loss \| (\S+) \(step (\d+): optimizer step (\d+)\) \|", markdown)
    assert found, markdown
    assert math.isclose(float(found[1]), float(lowest["val/loss"]), rel_tol=1e-5)  # (printed to 6 digits)
    assert int(found[2]) == int(lowest["step"]) and int(found[3]) == int(lowest["step"]) + 1
    # the same best as the run summary printed at the end of fit (which counts optimizer steps)
    printed_best = re.search(r"best val/loss +(\S+) +\(step (\d+)\)", caplog.text)
    assert int(printed_best[2]) == int(found[3]) and math.isclose(float(printed_best[1]), float(found[1]), abs_tol=1e-4)
    assert "| steps | 6 (the last step logged: 5) |" in markdown  # 6 optimizer steps; metrics.csv counts from 0
    assert re.search(r"\| wall time \| [\d.]+ s \(first to last TensorBoard event\) \|", markdown), markdown


def test_report_says_what_it_could_not_find(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "empty")])
    assert f"no metrics.csv under {tmp_path / 'empty'}" in capsys.readouterr().err


def test_a_metrics_file_cut_by_a_kill_is_reported_without_its_last_row(tmp_path):
    # A run killed while the CSV logger wrote a row leaves it half written; the report failed with
    # "could not convert string to float: ''", naming neither the file nor the row.
    from lightning_llm.report import read_metrics

    whole = "epoch,step,val/loss,train/loss\n0,1,8.5,8.4\n0,3,8.25,8.0\n"
    for cut in ("0,", "0,5,8.", "0,5,"):
        (tmp_path / "metrics.csv").write_text(whole + cut)
        with pytest.warns(UserWarning, match="metrics.csv:4: the last row is incomplete"):
            run = read_metrics(tmp_path / "metrics.csv")
        assert run.series == {"val/loss": [(1, 8.5), (3, 8.25)], "train/loss": [(1, 8.4), (3, 8.0)]}, cut
    # Lightning's writer ends its rows with \r\n: the same cut there
    (tmp_path / "metrics.csv").write_bytes((whole.replace("\n", "\r\n") + "0,5,8.").encode())
    with pytest.warns(UserWarning, match="metrics.csv:4: the last row is incomplete"):
        run = read_metrics(tmp_path / "metrics.csv")
    assert run.series == {"val/loss": [(1, 8.5), (3, 8.25)], "train/loss": [(1, 8.4), (3, 8.0)]}
    (tmp_path / "metrics.csv").write_text("epoch,step,val/loss\n0,1,8.5\n0,2,abc\n0,3,8.0\n")
    with pytest.raises(ValueError, match=r"metrics.csv:3: a row that is not one number"):  # not the last: an error
        read_metrics(tmp_path / "metrics.csv")


def test_report_of_a_gpu_run_with_benchmarks_reads_the_newest_metrics(tmp_path, capsys):
    # metrics.csv as Lightning's CSV logger writes it, with the columns a GPU run with MMLUCallback adds
    old, new = tmp_path / "lightning_logs" / "version_0", tmp_path / "lightning_logs" / "version_1"
    header = "epoch,step,train/loss,train/tokens,train/lr,perf/tokens_per_sec,perf/mfu,val/loss,bench/mmlu/acc,bench/mmlu/acc_stderr"
    rows = ["0,9,3.5,40960,0.001,51000,0.41,,,", "0,9,,,,,,3.25,,", "0,19,3.1,81920,0.0009,52000,0.43,,,",
            "0,19,,,,,,3.3,0.27,0.01", "0,29,2.9,122880,0.0007,50500,0.42,,,", "0,29,,,,,,3.28,0.31,0.01"]
    for folder, lines in ((old, rows[:2]), (new, rows)):
        folder.mkdir(parents=True)
        (folder / "metrics.csv").write_text("\n".join([header, *lines]) + "\n")
    os.utime(old / "metrics.csv", (1, 1))  # the older run
    main(["report", str(tmp_path), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert f"metrics read from {new / 'metrics.csv'}" in printed and str(old / "metrics.csv") in printed
    for name in ["mfu", "benchmarks", "loss_vs_tokens"]:
        assert (tmp_path / "out" / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE), name
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| best validation loss | 3.25 (step 9: optimizer step 10) |" in markdown  # the lowest, not the last
    assert "| mmlu/acc | 0.31 (step 29: optimizer step 30) |" in markdown and "acc_stderr |" not in markdown
    assert "| last MFU | 0.42 (step 29: optimizer step 30) |" in markdown
    assert "| tokens | 122,880 |" in markdown and "| steps | 30 (the last step logged: 29) |" in markdown
    assert "not known (no TensorBoard events beside metrics.csv)" in markdown
