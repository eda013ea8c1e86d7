"""Fault injection on the writers outside checkpoints and exports: the token and tokenizer caches, evaluation
results, the run report, the CLI's CSV logger, the example data generator.

A child process runs the writer and SIGKILLs itself at a chosen write (a test-only patch of `open`,
`os.fsync` or `os.replace`): right after opening a file for writing, at the fsync of its temporary, or at
the rename over the name. Then the name must hold the previous file untouched (or nothing, where there was
none), never a part of the new one, and the next write into that folder must remove what the killed one left.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lightning_llm.data.sources import Source
from lightning_llm.data.tokens import load_tokens, tokenize_to_file
from lightning_llm.eval.harness import write_results
from lightning_llm.report import write_report

# Installed in the child: SIGKILL this process at the first `op` on a temporary of the name `target`.
KILL_AT = """
import os, signal
def _kill_at(op, real, name_of):
    def watched(*args):
        if os.path.basename(name_of(*args)).startswith("." + TARGET + ".tmp-"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)
    setattr(os, op, watched)
if OP == "fsync":
    _kill_at("fsync", os.fsync, lambda fd: os.readlink(f"/proc/self/fd/{fd}"))
else:
    _kill_at("replace", os.replace, lambda src, dst: str(src))
"""


def run_killed(op: str | None, target: str | None, code: str, cwd: Path) -> None:
    """Run `code` in a child that is SIGKILLed at `op` ("fsync" or "replace") of the temporary of `target`
    (None: `code` kills itself)."""
    kill_at = f"TARGET, OP = {target!r}, {op!r}\n{KILL_AT}\n" if op is not None else ""
    program = f"{kill_at}{textwrap.dedent(code)}"
    done = subprocess.run([sys.executable, "-c", program], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, (done.returncode, done.stderr[-2000:])


def leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}.tmp-"))


@pytest.mark.parametrize("op", ["fsync", "replace"])
def test_a_token_cache_write_killed_leaves_no_token_file_and_the_next_one_cleans_up(op, corpus_dir, tokenizer, tmp_path):
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    cache = tmp_path / "tokens"
    run_killed(op, "corpus.bin", f"""
        from pathlib import Path
        from transformers import AutoTokenizer
        from lightning_llm.data.sources import Source
        from lightning_llm.data.tokens import tokenize_to_file
        tokenize_to_file(Source({str(corpus_dir)!r}), AutoTokenizer.from_pretrained({str(tokenizer_dir)!r}),
                         Path({str(cache / 'corpus.bin')!r}))
    """, tmp_path)
    assert not (cache / "corpus.bin").exists()  # the data module tokenizes again: it looks for this name
    assert len(leftovers(cache, "corpus.bin")) == 1

    tokenize_to_file(Source(str(corpus_dir)), tokenizer, cache / "corpus.bin")
    tokenize_to_file(Source(str(corpus_dir)), tokenizer, tmp_path / "reference" / "corpus.bin")  # uninterrupted
    assert sorted(p.name for p in cache.iterdir()) == ["corpus.bin", "corpus.json"]
    assert (load_tokens(cache / "corpus.bin") == load_tokens(tmp_path / "reference" / "corpus.bin")).all()


def test_a_results_write_killed_keeps_the_previous_file_and_the_next_one_cleans_up(tmp_path):
    out = tmp_path / "eval"
    old = {"results": {"arc_easy": {"acc,none": 0.25}}}
    write_results(old, out / "results.json")
    before = (out / "results.json").read_bytes()
    run_killed("replace", "results.json", f"""
        from lightning_llm.eval.harness import write_results
        write_results({{"results": {{"arc_easy": {{"acc,none": 0.75}}}}}}, {str(out / 'results.json')!r})
    """, tmp_path)
    assert (out / "results.json").read_bytes() == before
    assert json.loads(before) == old
    assert len(leftovers(out, "results.json")) == 1

    write_results(old, out / "results_2.json")
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results_2.json"]


@pytest.mark.slow  # the child imports matplotlib: ~20 s on 2 busy cores
def test_a_report_write_killed_keeps_the_previous_report_and_the_next_one_cleans_up(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step,train/loss\n1,4.0\n2,3.5\n")
    _, _, written = write_report(run)
    report = run / "report" / "report.md"
    before = report.read_bytes()
    (run / "metrics.csv").write_text("step,train/loss\n1,4.0\n2,3.5\n3,3.0\n")
    run_killed("replace", "report.md", f"""
        from lightning_llm.report import write_report
        write_report({str(run)!r})
    """, tmp_path)
    assert report.read_bytes() == before
    assert len(leftovers(report.parent, "report.md")) == 1

    write_report(run)
    assert sorted(p.name for p in report.parent.iterdir()) == sorted(p.name for p in written)
    assert report.read_bytes() != before  # the new step is in it


# Installed in the child: SIGKILL this process right after it opens a file for writing in FOLDER (created or
# truncated, nothing written yet).
KILL_AT_OPEN = """
import builtins, io, os, signal
_real_open = io.open
def _watched(file, mode="r", *args, **kwargs):
    opened = _real_open(file, mode, *args, **kwargs)
    if isinstance(file, (str, os.PathLike)) and set(mode) & set("wxa") and os.path.dirname(os.path.abspath(file)) == FOLDER:
        os.kill(os.getpid(), signal.SIGKILL)
    return opened
io.open = builtins.open = _watched
"""


def test_the_example_data_writer_killed_at_its_first_write_keeps_the_previous_file(tmp_path):
    # examples/make_sft_data.py writes the instruction set a run then trains on: a truncated file would be
    # trained on without a word.
    script = Path(__file__).parents[1] / "examples" / "make_sft_data.py"
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"messages": []}\n')
    program = f"""FOLDER = {str(data)!r}
{KILL_AT_OPEN}
import importlib.util
from pathlib import Path
spec = importlib.util.spec_from_file_location("make_sft_data", {str(script)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.write_jsonl([{{"messages": [{{"role": "user", "content": "new"}}]}}], Path({str(data / 'train.jsonl')!r}))
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, (done.returncode, done.stderr[-2000:])
    assert (data / "train.jsonl").read_text() == '{"messages": []}\n'


def test_the_csv_logger_killed_while_rewriting_its_header_keeps_the_metrics(tmp_path):
    # Lightning's CSV writer rewrites metrics.csv whole when a new metric appears (here val/loss, after the
    # training rows); the run's default logger must not lose the rows already there if killed then.
    program = f"""FOLDER = None
{KILL_AT_OPEN}
from lightning_llm.lightning_cli import default_loggers
logger = default_loggers({str(tmp_path)!r})[0]
logger.log_metrics({{"train/loss": 4.0}}, step=0)
logger.save()
FOLDER = logger.log_dir
logger.log_metrics({{"train/loss": 3.5, "val/loss": 3.75}}, step=1)
logger.save()
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, (done.returncode, done.stderr[-2000:])
    (metrics,) = tmp_path.glob("lightning_logs/version_0/metrics.csv")
    assert metrics.read_text().splitlines() == ["step,train/loss", "0,4.0"]


def test_a_tokenizer_cache_write_killed_is_trained_again_and_its_leftover_removed(tmp_path, corpus_dir):
    # The default tokenizer is trained once and cached (a directory written by new_directory/commit_directory);
    # killed at the fsync of its files, the cache must hold no tokenizer under its name, and the next run
    # trains it again (the same as an uninterrupted one) and removes the killed run's folder.
    from lightning_llm.data.tokenizer import trained_tokenizer

    train = f"trained_tokenizer(Source({str(corpus_dir)!r}).documents(), 300, 'corpus', {str(tmp_path / 'cache')!r}, max_chars=200_000)"
    run_killed(None, None, f"""
        import os, signal
        real_fsync = os.fsync
        def fsync(fd):
            if os.path.basename(os.readlink(f"/proc/self/fd/{{fd}}")) == "tokenizer.json":
                os.kill(os.getpid(), signal.SIGKILL)
            return real_fsync(fd)
        os.fsync = fsync
        from lightning_llm.data.sources import Source
        from lightning_llm.data.tokenizer import trained_tokenizer
        {train}
    """, tmp_path)
    (folder,) = (tmp_path / "cache" / "tokenizers").iterdir()
    assert folder.name.startswith(".bpe300-") and ".tmp-" in folder.name  # only the killed run's temporary
    tokenizer = trained_tokenizer(Source(str(corpus_dir)).documents(), 300, "corpus", tmp_path / "cache", max_chars=200_000)
    reference = trained_tokenizer(Source(str(corpus_dir)).documents(), 300, "corpus", tmp_path / "reference", max_chars=200_000)
    assert tokenizer.get_vocab() == reference.get_vocab()
    assert [p.name for p in (tmp_path / "cache" / "tokenizers").iterdir()] == [
        p.name for p in (tmp_path / "reference" / "tokenizers").iterdir()]


@pytest.mark.parametrize("op", ["fsync", "replace"])
def test_hparams_yaml_killed_while_written_keeps_the_previous_one(op, tmp_path):
    # Lightning's CSV writer writes hparams.yaml in place; the CLI's logger writes it beside and renames it.
    from lightning.pytorch.loggers import CSVLogger

    from lightning_llm.lightning_cli import AtomicCSVLogger

    AtomicCSVLogger(tmp_path / "run", version=0).log_hyperparams({"lr": 0.001, "model": "tiny"})
    hparams = tmp_path / "run" / "lightning_logs" / "version_0" / "hparams.yaml"
    before = hparams.read_bytes()
    run_killed(op, "hparams.yaml", f"""
        from lightning_llm.lightning_cli import AtomicCSVLogger
        AtomicCSVLogger({str(tmp_path / 'run')!r}, version=0).log_hyperparams({{"lr": 0.002, "model": "tiny"}})
    """, tmp_path)
    assert hparams.read_bytes() == before
    assert len(leftovers(hparams.parent, "hparams.yaml")) == 1
    AtomicCSVLogger(tmp_path / "run", version=0).log_hyperparams({"lr": 0.002, "model": "tiny"})
    # oracle: Lightning's own CSV logger given the same hyper-parameters
    CSVLogger(tmp_path / "lightning", version=0).log_hyperparams({"lr": 0.002, "model": "tiny"})
    assert hparams.read_bytes() == (tmp_path / "lightning" / "lightning_logs" / "version_0" / "hparams.yaml").read_bytes()
    assert leftovers(hparams.parent, "hparams.yaml") == []


def test_config_yaml_killed_while_written_keeps_the_previous_one(tmp_path, corpus_dir):
    # Lightning's SaveConfigCallback writes the run's config.yaml in place; the CLI's writes it beside and
    # renames it, with the same bytes as Lightning's.
    import yaml
    from lightning.pytorch.cli import SaveConfigCallback
    from test_cli import tiny_config

    from lightning_llm.lightning_cli import LLMCLI, AtomicSaveConfigCallback

    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tiny_config(tmp_path, corpus_dir)))
    setup = f"""
        from lightning_llm.data.pretrain import PretrainDataModule
        from lightning_llm.lightning_cli import LLMCLI, AtomicSaveConfigCallback
        from lightning_llm.modules.pretrain import PretrainModule
        cli = LLMCLI(PretrainModule, PretrainDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                     args=["--config", {str(tmp_path / 'run.yaml')!r}, "--trainer.default_root_dir", ROOT])
        AtomicSaveConfigCallback(cli.parser, cli.config, overwrite=True).setup(cli.trainer, cli.model, "fit")
    """
    exec(textwrap.dedent(setup), {"ROOT": str(tmp_path / "ours")})
    config = tmp_path / "ours" / "config.yaml"
    before = config.read_bytes()
    config.write_bytes(before + b"# an earlier run's\n")
    before = config.read_bytes()
    run_killed("fsync", "config.yaml", f"ROOT = {str(tmp_path / 'ours')!r}\n" + textwrap.dedent(setup), tmp_path)
    assert config.read_bytes() == before
    assert len(leftovers(config.parent, "config.yaml")) == 1
    # oracle: Lightning's own callback on the same parsed configuration
    from lightning_llm.data.pretrain import PretrainDataModule
    from lightning_llm.modules.pretrain import PretrainModule
    cli = LLMCLI(PretrainModule, PretrainDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                 args=["--config", str(tmp_path / "run.yaml"), "--trainer.default_root_dir", str(tmp_path / "ours")])
    AtomicSaveConfigCallback(cli.parser, cli.config, overwrite=True).setup(cli.trainer, cli.model, "fit")
    SaveConfigCallback(cli.parser, cli.config, config_filename="lightning.yaml", overwrite=True).setup(
        cli.trainer, cli.model, "fit")
    assert config.read_bytes() == (tmp_path / "ours" / "lightning.yaml").read_bytes()
    assert leftovers(config.parent, "config.yaml") == []
