"""PretrainModule: the objective, the optimizer, training, resume, export and bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_llm.cli import main
from lightning_llm.data.pretrain import PretrainDataModule
from lightning_llm.export import export_checkpoint, load_checkpoint, model_from_checkpoint
from lightning_llm.modules.pretrain import PretrainModule, next_token_loss, parameter_groups, warmup_cosine


class LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def make_trainer(tmp_path, max_steps, **kwargs):
    return Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                   enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in kwargs.get("callbacks", [])),
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   limit_val_batches=0, default_root_dir=tmp_path, **kwargs)


@pytest.fixture
def datamodule(corpus_dir, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    return PretrainDataModule(str(corpus_dir), tokenizer=str(tmp_path / "tok"), block_size=32, batch_size=4, cache_dir=str(tmp_path / "cache"))


def test_next_token_loss_matches_a_direct_computation():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, :2] = -100
    logp = logits.log_softmax(-1)
    keep = targets != -100
    direct = -logp[keep].gather(-1, targets[keep][:, None]).mean()
    torch.testing.assert_close(next_token_loss(logits, targets), direct)


def test_schedule_warms_up_then_decays_to_the_floor():
    lrs = [warmup_cosine(s, 10, 100, 0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert lrs[100] == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_and_embeddings():
    module = PretrainModule("tiny", vocab_size=64)
    module.configure_model()
    decay, no_decay = parameter_groups(module, 0.1)
    names = {id(p): n for n, p in module.named_parameters()}
    assert all("proj" in names[id(p)] for p in decay["params"])
    assert {names[id(p)].split(".")[-2] for p in no_decay["params"]} >= {"embed_tokens", "input_layernorm", "norm"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.parameters()))


def test_training_lowers_the_validation_loss(datamodule, tmp_path):
    module = PretrainModule("tiny", lr=5e-3, warmup_steps=5)
    trainer = Trainer(accelerator="cpu", max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      num_sanity_val_steps=-1, val_check_interval=40, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=datamodule)
    (_, first), (_, last) = module.val_history[0], module.val_history[-1]
    assert first == pytest.approx(math.log(512), rel=0.1)  # an untrained model is near uniform
    assert last < first - 0.5
    assert module.tokens_seen == 40 * 4 * 32
    assert module.model.config.vocab_size == 512  # taken from the tokenizer


def test_resume_mid_epoch_continues_exactly(datamodule, tmp_path):
    """N steps, save, resume, N steps: the same losses as 2N steps straight (same data order too)."""
    torch.manual_seed(0)
    straight = LossRecorder()
    make_trainer(tmp_path / "a", 8, callbacks=[straight]).fit(PretrainModule("tiny", warmup_steps=2), datamodule=datamodule)

    torch.manual_seed(0)
    first = LossRecorder()
    # the checkpoint is written the way a run writes it: by ModelCheckpoint, mid-epoch
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_last=True)
    trainer = make_trainer(tmp_path / "b", 4, callbacks=[first, saver])
    trainer.fit(PretrainModule("tiny", warmup_steps=2, max_steps=8), datamodule=datamodule)
    second = LossRecorder()
    torch.manual_seed(123)  # the resumed run must not depend on the seed of the process
    make_trainer(tmp_path / "c", 8, callbacks=[second]).fit(PretrainModule("tiny", warmup_steps=2, max_steps=8),
                                                            datamodule=datamodule, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert len(second.losses) == 4
    torch.testing.assert_close(torch.tensor(first.losses + second.losses), torch.tensor(straight.losses), rtol=1e-5, atol=1e-5)


def test_export_loads_in_transformers_with_the_same_logits(datamodule, tmp_path, capsys):
    module = PretrainModule("tiny", warmup_steps=2)
    trainer = make_trainer(tmp_path, 3)
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    out = export_checkpoint(tmp_path / "run.ckpt", tmp_path / "hf")
    assert (out / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("def f(x):\n    return x", return_tensors="pt")["input_ids"]
    module.model.eval()
    torch.testing.assert_close(loaded(ids).logits, module.model(ids).logits, rtol=0, atol=1e-5)
    assert tok.get_vocab() == datamodule.tokenizer.get_vocab()
    # exporting again onto a non-empty directory is refused and leaves the first export intact
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export_checkpoint(tmp_path / "run.ckpt", out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".hf")) == []
    # --merge is for adapter checkpoints: on a whole model the command line says so and writes nothing
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(tmp_path / "run.ckpt"), "--out", str(tmp_path / "merged"), "--merge"])
    assert "LoRA/QLoRA checkpoints only" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_export_of_a_bad_checkpoint_leaves_nothing(tmp_path):
    torch.save({"state_dict": {"other.weight": torch.zeros(1)}, "hf_config": {"model_type": "llama"}}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="no weights under 'model.'"):
        export_checkpoint(tmp_path / "bad.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # A default Llama config is 7B parameters: the mismatch must be found before anything is allocated.
    torch.save({"state_dict": {"model.lm_head.weight": torch.zeros(2, 2)}, "hf_config": {"model_type": "llama"}}, tmp_path / "bad2.ckpt")
    with pytest.raises(ValueError, match="do not fit its hf_config"):
        export_checkpoint(tmp_path / "bad2.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(ValueError, match="not a sharded checkpoint"):
        load_checkpoint(tmp_path / "plain_dir")


def test_block_size_over_the_models_positions(corpus_dir, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    dm = PretrainDataModule(str(corpus_dir), tokenizer=str(tmp_path / "tok"), block_size=1024, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="block_size 1024 exceeds the model's max_position_embeddings 512"):
        make_trainer(tmp_path, 1).fit(PretrainModule("tiny"), datamodule=dm)


def test_tokenizer_larger_than_a_pretrained_vocabulary(datamodule, tmp_path):
    from lightning_llm.models import build_model

    build_model("tiny", vocab_size=100).save_pretrained(tmp_path / "small_vocab")
    with pytest.raises(ValueError, match="the tokenizer has 512 tokens but the model's vocabulary is 100"):
        make_trainer(tmp_path, 1).fit(PretrainModule(str(tmp_path / "small_vocab")), datamodule=datamodule)


def test_checkpoint_rebuilds_the_model_for_inference(datamodule, tmp_path):
    module = PretrainModule("tiny")
    trainer = make_trainer(tmp_path, 1)
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    rebuilt = model_from_checkpoint(load_checkpoint(tmp_path / "one.ckpt"))
    for (name, a), b in zip(module.model.state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(a, b), name


def test_an_export_is_what_plain_transformers_expects(datamodule, tmp_path, monkeypatch):
    # config.json and generation_config.json name the tokenizer's EOS and pad, so a plain `generate` (no
    # eos_token_id or pad_token_id passed) stops at EOS; the tokenizer truncates to the model's window. All of it
    # loaded from another working directory.
    module = PretrainModule("tiny", warmup_steps=1)
    trainer = make_trainer(tmp_path, 1)
    trainer.fit(module, datamodule=datamodule)
    # a final norm of zeros makes every logit 0, so greedy decoding picks the first token: the tokenizer's EOS
    assert datamodule.tokenizer.eos_token_id == 0
    module.model.model.norm.weight.data.zero_()
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    out = export_checkpoint(tmp_path / "run.ckpt", tmp_path / "hf")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert (model.config.eos_token_id, model.config.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    ids = tok("def f(x):", return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert generated[0, ids.shape[1]:].tolist() == [tok.eos_token_id]
    window = model.config.max_position_embeddings
    assert tok.model_max_length == window
    assert len(tok("x " * 2 * window, truncation=True)["input_ids"]) == window


def test_a_non_finite_model_is_never_exported(datamodule, tmp_path):
    # A checkpoint whose weights hold a NaN (a diverged run, written before the divergence guard) is refused by
    # export, naming the tensor, and an earlier export at the same place is left as it was.
    module = PretrainModule("tiny", warmup_steps=1)
    trainer = make_trainer(tmp_path, 1)
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(tmp_path / "good.ckpt")
    good = export_checkpoint(tmp_path / "good.ckpt", tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    # the run's own DivergenceGuard refuses to write such a checkpoint (tests/test_divergence.py), so the
    # NaN goes into a copy of the file, as a checkpoint from another program or an older run would have it
    checkpoint = torch.load(tmp_path / "good.ckpt", weights_only=False)
    checkpoint["state_dict"]["model.model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    torch.save(checkpoint, tmp_path / "diverged.ckpt")
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.up_proj\.weight \(1 of \d+\).*earlier, finite checkpoint"):
        export_checkpoint(tmp_path / "diverged.ckpt", tmp_path / "hf", overwrite=True)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before


def test_resume_across_the_epoch_end_is_exact_and_lightning_sees_a_resumable_loader(corpus_dir, tokenizer, tmp_path):
    """A 7-batch epoch, a checkpoint at step 4, resumed to step 10: the same losses as 10 steps straight
    (the resumed epoch ends after its 7th batch, not early), Lightning counts the whole epoch, and it does
    not warn that the loader is not resumable (the loader's position travels in the checkpoint)."""
    tokenizer.save_pretrained(tmp_path / "tok")

    def data():
        return PretrainDataModule(str(corpus_dir), tokenizer=str(tmp_path / "tok"), block_size=32, batch_size=4,
                                  train_blocks=28, cache_dir=str(tmp_path / "cache"))

    torch.manual_seed(0)
    straight = LossRecorder()
    make_trainer(tmp_path / "a", 10, callbacks=[straight]).fit(PretrainModule("tiny", warmup_steps=2), datamodule=data())
    torch.manual_seed(0)
    first = LossRecorder()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_last=True)
    make_trainer(tmp_path / "b", 4, callbacks=[first, saver]).fit(PretrainModule("tiny", warmup_steps=2, max_steps=10), datamodule=data())
    second = LossRecorder()
    resumed = make_trainer(tmp_path / "c", 10, callbacks=[second])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.fit(PretrainModule("tiny", warmup_steps=2, max_steps=10), datamodule=data(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert resumed.num_training_batches == 7
    torch.testing.assert_close(torch.tensor(first.losses + second.losses), torch.tensor(straight.losses), rtol=1e-5, atol=1e-5)
