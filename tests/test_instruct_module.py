"""InstructionTuningModule: packed attention stays inside examples, starting points, the YAML example, and tuning works."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Trainer, seed_everything

from lightning_llm.data.instruct import (
    InstructionDataModule,
    PackedExamples,
    SingleExamples,
    pad_collate,
    to_messages,
    tokenize_conversation,
    training_sample,
    use_chat_template,
)
from lightning_llm.models import build_model
from lightning_llm.modules.instruct import InstructionTuningModule, attend_per_example
from _precision_helpers import draw_residual_branches
from tolerances import loss_atol, reordered_sum_rtol

ROOT = Path(__file__).resolve().parents[1]


def load_example_script():
    spec = importlib.util.spec_from_file_location("make_sft_data", ROOT / "examples" / "make_sft_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_sft_data = load_example_script()


@pytest.fixture
def chat_tokenizer(tokenizer):
    return use_chat_template(copy.deepcopy(tokenizer))


def trainer(tmp_path, max_steps, **kwargs):
    return Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                   default_root_dir=tmp_path, **kwargs)


def samples_of(tokenizer, questions):
    out = []
    for question, answer in questions:
        messages = to_messages({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
        out.append(training_sample(*tokenize_conversation(tokenizer, messages), block_size=128, truncate=True))
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager", "lightning_fa2"])
def test_packed_examples_do_not_attend_across_and_lose_what_unpacked_lose(chat_tokenizer, attn):
    torch.manual_seed(0)
    module = InstructionTuningModule("tiny", vocab_size=len(chat_tokenizer), attn_implementation=attn)
    module.configure_model()
    draw_residual_branches(module.model)  # zero at init: the logits would not depend on attention at all
    module.eval()
    qa = [("What is 3 + 4?", "7"), ("Reverse the words: stone river", "river stone"), ("Say hi.", "hi")]
    samples = samples_of(chat_tokenizer, qa)
    lengths = [len(ids) for ids, _ in samples]
    block = sum(lengths) + 5  # room for a padding segment too
    pad = chat_tokenizer.pad_token_id
    packed = pad_collate([PackedExamples(samples, [np.arange(3)], block, pad)[0]], pad)
    unpacked = pad_collate([SingleExamples(samples, np.arange(3))[i] for i in range(3)], pad)

    with torch.no_grad():
        logits = module(packed["input_ids"], packed.get("position_ids"))[0]
        alone = module(unpacked["input_ids"])
        starts = np.cumsum([0] + lengths)
        for i, n in enumerate(lengths):  # each packed example computes what it computes alone
            torch.testing.assert_close(logits[starts[i]:starts[i] + n], alone[i, :n], rtol=1e-4, atol=1e-5)
        # the same loss as the padded batch, and as one batch per example weighted by its answer tokens
        torch.testing.assert_close(module.loss(packed), module.loss(unpacked), rtol=1e-5, atol=1e-6)
        answer_tokens = [int((targets != -100).sum()) for _, targets in samples]
        one_by_one = [module.loss(pad_collate([SingleExamples(samples, np.array([i]))[0]], pad)) for i in range(3)]
        weighted = sum(loss * n for loss, n in zip(one_by_one, answer_tokens)) / sum(answer_tokens)
        torch.testing.assert_close(module.loss(packed), weighted, rtol=1e-5, atol=1e-6)

        # change the middle example: the first and the last see nothing of it
        changed = packed["input_ids"].clone()
        middle = slice(starts[1], starts[2])
        changed[0, middle] = torch.randint(0, 512, (lengths[1],))
        after = module(changed, packed["position_ids"])[0]
        torch.testing.assert_close(after[: starts[1]], logits[: starts[1]], rtol=0, atol=1e-6)
        torch.testing.assert_close(after[starts[2] :], logits[starts[2] :], rtol=0, atol=1e-6)
        assert not torch.allclose(after[middle], logits[middle], atol=1e-3)  # the change itself is seen
        # without the restarting position ids the last example would see the others: the test can fail
        leaky = module(changed, None)[0]
        assert not torch.allclose(leaky[starts[2] :], module(packed["input_ids"], None)[0, starts[2] :], atol=1e-4)


def attached(module, packing):
    """The module as a trainer with an instruction data module would configure it (only what it reads)."""
    module.trainer = SimpleNamespace(callbacks=[], datamodule=SimpleNamespace(packing=packing))
    module.configure_model()
    return module


def test_packed_data_attends_per_example_by_default_and_loses_what_the_block_mask_loses(chat_tokenizer, monkeypatch):
    torch.manual_seed(0)
    module = attached(InstructionTuningModule("tiny", vocab_size=len(chat_tokenizer)), packing=True)
    assert module.model.config._attn_implementation == "lightning_fa2"
    # the oracle: transformers' sdpa attention, a dense block-diagonal mask over each block; a choice is kept
    masked = attached(InstructionTuningModule("tiny", vocab_size=len(chat_tokenizer), attn_implementation="sdpa"),
                      packing=True)
    assert masked.model.config._attn_implementation == "sdpa"
    masked.model.load_state_dict(module.model.state_dict())
    qa = [("What is 3 + 4?", "7"), ("Reverse the words: stone river", "river stone"), ("Say hi.", "hi"),
          ("What is 12 + 30?", "42")]
    samples = samples_of(chat_tokenizer, qa)
    lengths = [len(ids) for ids, _ in samples]
    block = max(lengths[0] + lengths[1], lengths[2] + lengths[3]) + 3  # each row ends in padding
    pad = chat_tokenizer.pad_token_id
    packed = pad_collate([PackedExamples(samples, [np.arange(2), np.arange(2, 4)], block, pad)[i] for i in range(2)], pad)

    key_lengths = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(query, key, value, **kwargs):
        key_lengths.append(key.shape[-2])
        return sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    loss = module.loss(packed)
    loss.backward()
    assert key_lengths and max(key_lengths) <= max(lengths) < block  # no query meets a key of another example
    expected = masked.loss(packed)
    expected.backward()
    # float32 twins that differ only in the order of attention's roundings (sums over one example's keys
    # against sums over the block's, whose masked terms are exactly 0).
    torch.testing.assert_close(loss, expected, rtol=0, atol=loss_atol(torch.float32))
    rtol = reordered_sum_rtol(torch.float32, packed["input_ids"].numel())  # a weight's gradient sums over the tokens
    for (name, p), p_ref in zip(module.model.named_parameters(), masked.model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=rtol, atol=rtol * p_ref.grad.abs().max().item(), msg=name)


def test_packed_data_keeps_the_default_attention_where_lightning_fa2_cannot_run(chat_tokenizer):
    with_dropout = build_model("tiny", attention_dropout=0.1)  # lightning_fa2 refuses attention dropout
    attend_per_example(with_dropout)
    assert with_dropout.config._attn_implementation == "sdpa"
    unpacked = attached(InstructionTuningModule("tiny", vocab_size=len(chat_tokenizer)), packing=False)
    assert unpacked.model.config._attn_implementation == "sdpa"


def export_tiny(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "export")
    tokenizer.save_pretrained(tmp_path / "export")
    return model, str(tmp_path / "export")


def write_records(path, n, seed=0, tasks=("reverse",)):
    records = make_sft_data.make_records(tasks, n, seed)
    make_sft_data.write_jsonl(records, path)
    return records


def test_starts_from_an_export_then_from_its_checkpoint(tmp_path, tokenizer):
    pretrained, export = export_tiny(tmp_path, tokenizer)
    data = tmp_path / "train.jsonl"
    write_records(data, 64)
    module = InstructionTuningModule(export, lr=1e-3, warmup_steps=1)
    assert module.tokenizer is not None and len(module.tokenizer) == len(tokenizer)  # the export's tokenizer
    dm = InstructionDataModule(str(data), block_size=64, batch_size=4, val_fraction=0)  # no tokenizer: the model's
    fit = trainer(tmp_path, 0)
    fit.fit(module, datamodule=dm)
    # the default template's three role tokens got embeddings; the pretrained rows are untouched
    embeddings = module.model.get_input_embeddings().weight
    assert module.model.training  # from_pretrained hands back eval mode; tuning trains
    assert module.model.config.vocab_size == len(tokenizer) + 3 == len(module.tokenizer)
    torch.testing.assert_close(embeddings[: len(tokenizer)], pretrained.get_input_embeddings().weight, rtol=0, atol=0)
    assert module.tokenizer is dm.tokenizer

    ckpt = tmp_path / "sft.ckpt"
    fit = trainer(tmp_path, 3)
    fit.fit(module, datamodule=dm)
    fit.save_checkpoint(ckpt)
    resumed = InstructionTuningModule(str(ckpt))
    assert resumed.tokenizer.chat_template == dm.tokenizer.chat_template and len(resumed.tokenizer) == len(tokenizer) + 3
    resumed.configure_model()
    for (name, a), b in zip(module.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        InstructionTuningModule(str(tmp_path / "missing.ckpt"))


def test_a_data_module_without_tokenizer_needs_a_model_that_has_one(tmp_path):
    data = tmp_path / "train.jsonl"
    write_records(data, 8)
    with pytest.raises(ValueError, match="InstructionDataModule has no tokenizer"):
        trainer(tmp_path, 1).fit(InstructionTuningModule("tiny"), datamodule=InstructionDataModule(str(data), batch_size=1, block_size=64))


def test_the_yaml_example_runs_through_the_cli(tmp_path, tokenizer):
    from lightning_llm.cli import main

    _, export = export_tiny(tmp_path, tokenizer)
    data = tmp_path / "train.jsonl"
    write_records(data, 64)
    config = yaml.safe_load((ROOT / "examples" / "sft_tiny.yaml").read_text())
    config["model"]["init_args"]["model"] = export
    config["data"]["init_args"].update(sources=str(data), block_size=64, batch_size=4)
    config["trainer"].update(max_steps=2, val_check_interval=None, num_sanity_val_steps=0, limit_val_batches=1,
                             default_root_dir=str(tmp_path), logger=False, callbacks=None, enable_checkpointing=False)
    config["export_dir"] = str(tmp_path / "hf")
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert "<|assistant|>" in exported.get_vocab() and "<|assistant|>" in exported.chat_template
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.vocab_size == len(exported)


def test_tuning_raises_exact_match_on_held_out_questions(tmp_path, tokenizer):
    """Word-list reversal, 200 steps of the tiny model from random weights.

    Measured (this machine, seed 0): exact match 0.00 before, 0.84 after, on 50 held-out questions.
    """
    records = make_sft_data.make_records(("reverse",), 2000, seed=0)
    train, test = make_sft_data.split_records(records, 0.1)
    test = test[:50]
    make_sft_data.write_jsonl(train, tmp_path / "train.jsonl")
    tokenizer.save_pretrained(tmp_path / "tok")
    seed_everything(0)
    dm = InstructionDataModule(str(tmp_path / "train.jsonl"), tokenizer=str(tmp_path / "tok"), block_size=128, batch_size=16, val_fraction=0)
    dm.setup()
    module = InstructionTuningModule("tiny", lr=5e-3, warmup_steps=10)
    module.tokenizer = dm.tokenizer
    module.configure_model()  # the untuned model
    module.model.eval()
    before = make_sft_data.exact_match(module.model, dm.tokenizer, test)
    module.model.train()
    trainer(tmp_path, 200).fit(module, datamodule=dm)
    module.model.eval()
    after = make_sft_data.exact_match(module.model, dm.tokenizer, test)
    assert before <= 0.02 and after >= 0.5, (before, after)


def test_every_pretrain_option_is_an_instruction_tuning_option():
    # The subclass saves its own arguments as hyper-parameters: an option of PretrainModule it did not take
    # would be missing from `hparams` where the shared code reads it (capacity_factor was, and crashed the fit).
    import inspect

    from lightning_llm.modules.pretrain import PretrainModule

    ours = inspect.signature(InstructionTuningModule.__init__).parameters
    assert set(inspect.signature(PretrainModule.__init__).parameters) <= set(ours)


def other_tokenizer(corpus_dir, size):
    """A BPE of the same size trained on other text: the same ids stand for other tokens."""
    from lightning_llm.data.sources import Source
    from lightning_llm.data.tokenizer import train_tokenizer

    return train_tokenizer((text[::-1] for text in Source(str(corpus_dir)).documents()), vocab_size=size)


def test_tuning_refuses_data_tokenized_with_another_vocabulary_than_the_models(tmp_path, tokenizer, corpus_dir):
    """The export was trained with `tokenizer`; data tokenized by another BPE of the same size trained on
    without a word (a data module that names a tokenizer overrode the model's)."""
    _, export = export_tiny(tmp_path, tokenizer)
    other_tokenizer(corpus_dir, len(tokenizer)).save_pretrained(tmp_path / "other")
    data = tmp_path / "train.jsonl"
    write_records(data, 16)
    with pytest.raises(ValueError, match=r"not the one the weights of .*export' were trained with: \d+ of its 512 tokens have another id"):
        trainer(tmp_path, 0).fit(InstructionTuningModule(export), datamodule=InstructionDataModule(
            str(data), tokenizer=str(tmp_path / "other"), block_size=64, batch_size=2, val_fraction=0))
    # the model's own tokenizer, named or left unset, is its vocabulary (plus the template's role tokens)
    for named in (export, None):
        trainer(tmp_path, 0).fit(InstructionTuningModule(export), datamodule=InstructionDataModule(
            str(data), tokenizer=named, block_size=64, batch_size=2, val_fraction=0))


def test_continued_pretraining_refuses_a_corpus_tokenizer_that_is_not_the_models(tmp_path, tokenizer, corpus_dir):
    """A pretraining data module without a tokenizer trains a BPE on its corpus: continued pretraining of
    an export went on with it, its ids meaning other tokens to the weights."""
    from lightning_llm.data.pretrain import PretrainDataModule
    from lightning_llm.modules.pretrain import PretrainModule

    _, export = export_tiny(tmp_path, tokenizer)
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "doc.txt").write_text("".join(reversed((corpus_dir / "shlex.py").read_text())))
    with pytest.raises(ValueError, match=r"give the data module tokenizer=.*export'"):
        trainer(tmp_path, 0).fit(PretrainModule(export), datamodule=PretrainDataModule(
            str(tmp_path / "new"), vocab_size=len(tokenizer), block_size=32, batch_size=2, cache_dir=str(tmp_path / "cache")))
    trainer(tmp_path, 0).fit(PretrainModule(export), datamodule=PretrainDataModule(
        str(tmp_path / "new"), tokenizer=export, block_size=32, batch_size=2, cache_dir=str(tmp_path / "cache")))
