"""Instruction data: record formats, exact label masks, truncation, bad input, packing and mixtures."""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch

from lightning_llm.data.instruct import (
    BadRecord,
    InstructionDataModule,
    Overlong,
    PackedExamples,
    pack_examples,
    pad_collate,
    to_messages,
    tokenize_conversation,
    training_sample,
    use_chat_template,
)

E = "<|endoftext|>"  # the default template ends every turn with EOS

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Hand-written: each record, and the text of its conversation as runs of (text, trained?).
CASES = {
    "messages, system, single turn": (
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"},
                      {"role": "assistant", "content": "5"}]},
        [(f"<|system|>\nBe brief.{E}<|user|>\nWhat is 2+3?{E}<|assistant|>\n", False), (f"5{E}", True)],
    ),
    "messages, multi-turn": (
        {"messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "A lemon."},
                      {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "An apple, then."}]},
        [(f"<|user|>\nName a fruit.{E}<|assistant|>\n", False), (f"A lemon.{E}", True),
         (f"<|user|>\nAnother?{E}<|assistant|>\n", False), (f"An apple, then.{E}", True)],
    ),
    "alpaca with input": (
        {"instruction": "Add the numbers.", "input": "2 3", "output": "5"},
        [(f"<|user|>\nAdd the numbers.\n\n2 3{E}<|assistant|>\n", False), (f"5{E}", True)],
    ),
    "alpaca without input": (
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        [(f"<|user|>\nSay hi.{E}<|assistant|>\n", False), (f"hi{E}", True)],
    ),
    "sharegpt, system, multi-turn": (
        {"conversations": [{"from": "system", "value": "You count."}, {"from": "human", "value": "1 2"},
                           {"from": "gpt", "value": "3"}, {"from": "human", "value": "4 5"}, {"from": "gpt", "value": "6"}]},
        [(f"<|system|>\nYou count.{E}<|user|>\n1 2{E}<|assistant|>\n", False), (f"3{E}", True),
         (f"<|user|>\n4 5{E}<|assistant|>\n", False), (f"6{E}", True)],
    ),
    "prompt/completion": (
        {"prompt": "def add(a, b):", "completion": "    return a + b"},
        [(f"<|user|>\ndef add(a, b):{E}<|assistant|>\n", False), (f"    return a + b{E}", True)],
    ),
}


@pytest.fixture
def chat_tokenizer(tokenizer):
    """The session tokenizer with the default chat template (a copy: the session's stays untouched)."""
    return use_chat_template(copy.deepcopy(tokenizer))


def runs(tokenizer, ids, trained):
    """Maximal runs of trained / untrained tokens, decoded: a single mislabelled token changes them."""
    return [(tokenizer.decode([t for t, _ in group], skip_special_tokens=False, clean_up_tokenization_spaces=False), flag)
            for flag, group in itertools.groupby(zip(ids, trained), key=lambda x: x[1])]


@pytest.mark.parametrize("case", list(CASES))
def test_label_masks_are_exact_for_each_format(chat_tokenizer, case):
    record, expected = CASES[case]
    ids, trained = tokenize_conversation(chat_tokenizer, to_messages(record))
    assert runs(chat_tokenizer, ids, trained) == expected


def random_record(rng):
    """A conversation of random text (words, digits, punctuation, newlines, unicode) in a random format."""
    def text():
        pieces = ["the", " cat", "42", "\n", "  ", "def f(x):", "é", "—", "<|", "|>", "user", "\t", "!"]
        return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))).strip() or "x"

    turns = [(text(), text()) for _ in range(rng.randint(1, 4))]
    system = text() if rng.random() < 0.5 else None
    format = rng.choice(["messages", "sharegpt", "alpaca", "prompt_completion"])
    if format == "alpaca":
        return {"instruction": turns[0][0], "input": text(), "output": turns[0][1]}, [turns[0][1]]
    if format == "prompt_completion":
        return {"prompt": turns[0][0], "completion": turns[0][1]}, [turns[0][1]]
    role, content, names = ("role", "content", ("user", "assistant")) if format == "messages" else ("from", "value", ("human", "gpt"))
    turns_out = [{role: "system", content: system}] if system else []
    turns_out += [{role: name, content: t} for q, a in turns for name, t in zip(names, (q, a))]
    return {"messages" if format == "messages" else "conversations": turns_out}, [a for _, a in turns]


def test_the_trained_tokens_decode_to_the_answers_and_nothing_else(chat_tokenizer):
    """An oracle that needs no hand-written runs: on random conversations of every format, the unmasked
    tokens decode to the concatenated answers, each with its end of turn (EOS for the default template)."""
    import random

    rng = random.Random(0)
    for _ in range(200):
        record, answers = random_record(rng)
        messages = to_messages(record)
        ids, trained = tokenize_conversation(chat_tokenizer, messages)
        answer_ids = [t for t, is_trained in zip(ids, trained) if is_trained]
        assert chat_tokenizer.decode(answer_ids, clean_up_tokenization_spaces=False) == "".join(a + E for a in answers), record
        # and no text is lost or added: all the tokens decode to the rendered conversation
        rendered = chat_tokenizer.apply_chat_template(messages, tokenize=False)
        assert chat_tokenizer.decode(ids, clean_up_tokenization_spaces=False) == rendered, record


def test_the_tokenizers_own_template_is_used(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = CHATML
    n = len(tok)
    use_chat_template(tok)
    assert len(tok) == n and tok.chat_template == CHATML  # no default role tokens added
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                           {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]}
    ids, trained = tokenize_conversation(tok, to_messages(record))
    assert runs(tok, ids, trained) == [
        ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False), ("Hello<|im_end|>\n", True),
        ("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", False), ("Bye!<|im_end|>\n", True),
    ]


def test_default_template_adds_its_role_tokens_once(tokenizer):
    tok = copy.deepcopy(tokenizer)
    use_chat_template(tok)
    use_chat_template(tok, "default")
    assert len(tok) == len(tokenizer) + 3
    assert tok.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>"]) == [len(tokenizer), len(tokenizer) + 1, len(tokenizer) + 2]
    assert tok("<|user|>", add_special_tokens=False)["input_ids"] == [len(tokenizer) + 1]  # never split


def test_train_on_prompt_trains_every_token(chat_tokenizer):
    record, expected = CASES["messages, multi-turn"]
    ids, trained = tokenize_conversation(chat_tokenizer, to_messages(record), train_on_prompt=True)
    assert all(trained) and runs(chat_tokenizer, ids, trained) == [("".join(text for text, _ in expected), True)]


def test_targets_are_the_next_trained_tokens():
    ids, trained = [10, 11, 12, 13, 14, 15], [False, False, False, True, True, False]
    input_ids, targets = training_sample(ids, trained, block_size=16, truncate=True)
    assert input_ids.tolist() == [10, 11, 12, 13, 14]
    assert targets.tolist() == [-100, -100, 13, 14, -100]


def test_truncation_keeps_answers_or_drops_the_example():
    ids, trained = list(range(10)), [False] * 4 + [True] * 6
    input_ids, targets = training_sample(ids, trained, block_size=6, truncate=True)
    assert input_ids.tolist() == [0, 1, 2, 3, 4, 5] and targets.tolist() == [-100, -100, -100, 4, 5, 6]
    with pytest.raises(Overlong, match="no answer tokens left after truncation"):
        training_sample(ids, [False] * 8 + [True] * 2, block_size=6, truncate=True)
    with pytest.raises(Overlong, match=r"longer than the block \(9 > 6 tokens\)"):
        training_sample(ids, trained, block_size=6, truncate=False)


@pytest.mark.parametrize(("record", "message"), [
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant answer"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}, "empty answer"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role .'tool' in messages.0."),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "unknown role .'bot'"),
    ({"instruction": "x"}, "missing field .'output'"),
    ({"prompt": "x", "completion": 3}, "field is not a string"),
    ({"text": "x"}, "unknown record format"),
    ({"messages": [], "id": 3}, "no assistant answer"),
    (["x"], "not a JSON object"),
    # what other tools' dialects put beside a format's fields, which would go unread
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "bad", "weight": 0}]},
     r"unsupported turn field \(messages\[1\] has 'weight'"),
    ({"conversations": [{"from": "human", "value": "x", "name": "Ann"}, {"from": "gpt", "value": "y"}]},
     r"unsupported turn field \(conversations\[0\] has 'name'"),
    ({"instruction": "x", "output": "y", "history": [["q", "a"]]}, r"unsupported field \('history' would not be read"),
    ({"prompt": "x", "completion": "y", "messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "q"}]},
     r"fields of several formats \('messages', 'prompt'; pass the source's format"),
    ({"system": "S", "messages": [{"role": "system", "content": "T"}, {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "two system prompts"),
])
def test_bad_records_are_refused_with_the_reason(record, message):
    with pytest.raises(BadRecord, match=message):
        to_messages(record)


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def qa(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.fixture
def tokenizer_dir(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    return str(tmp_path / "tok")


def test_bad_input_stops_with_file_and_line_or_is_counted(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        qa("What is 1 + 1?", "2"),
        '{"messages": [',                                                   # line 2: malformed JSON
        {"instruction": "Add."},                                            # line 3: missing output
        qa("Say nothing.", ""),                                             # line 4: empty answer
        {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},  # line 5
        qa("word " * 80, "too late"),                                       # line 6: the answer is past the block
        qa("What is 2 + 2?", "4"),
    ])
    strict = InstructionDataModule(str(path), tokenizer=tokenizer_dir, block_size=32, batch_size=1, val_fraction=0)
    with pytest.raises(BadRecord, match=r"bad\.jsonl:2: not valid JSON"):
        strict.setup()
    lenient = InstructionDataModule(str(path), tokenizer=tokenizer_dir, block_size=32, batch_size=1, val_fraction=0, on_error="skip")
    with pytest.warns(UserWarning, match=r"bad\.jsonl:3: missing field"):
        lenient.setup()
    stats = lenient.stats["bad.jsonl"]
    assert stats["examples"] == 2 and stats["dropped"] == 5
    assert {k: v for k, v in stats.items() if k.startswith("dropped: ")} == {
        "dropped: not valid JSON": 1, "dropped: missing field": 1, "dropped: empty answer": 1,
        "dropped: unknown role": 1, "dropped: no answer tokens left after truncation to the block": 1,
    }


def test_an_overlong_example_is_a_counted_skip_even_when_strict(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "long.jsonl", [qa("What is 1 + 1?", "2"), qa("Why?", "because " * 40)])
    dm = InstructionDataModule(str(path), tokenizer=tokenizer_dir, block_size=32, batch_size=1, val_fraction=0, truncate=False)
    dm.setup()
    assert dm.stats["long.jsonl"]["dropped: longer than the block"] == 1 and dm.stats["long.jsonl"]["examples"] == 1


def test_best_fit_packing_places_every_example_once_within_the_block():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, size=500)
    blocks = pack_examples(lengths, 64, seed=0)
    placed = np.concatenate(blocks)
    assert sorted(placed.tolist()) == list(range(500))
    assert max(lengths[b].sum() for b in blocks) <= 64
    # no two blocks could have been one: best fit leaves no pair of blocks that fits together
    fills = sorted(lengths[b].sum() for b in blocks)
    assert fills[0] + fills[1] > 64
    halves = pack_examples(np.full(10, 32), 64, seed=0)
    assert len(halves) == 5  # exactly two halves per block
    with pytest.raises(ValueError, match="does not fit a block of 64"):
        pack_examples(np.array([65]), 64, seed=0)


def test_a_packed_block_restarts_positions_per_example_and_pads_as_its_own_segment():
    samples = [(np.array([1, 2, 3]), np.array([-100, 3, 4])), (np.array([5, 6]), np.array([6, -100]))]
    item = PackedExamples(samples, [np.array([0, 1])], block_size=8, pad_id=0)[0]
    assert item["input_ids"].tolist() == [1, 2, 3, 5, 6, 0, 0, 0]
    assert item["targets"].tolist() == [-100, 3, 4, 6, -100, -100, -100, -100]
    assert item["position_ids"].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert item["num_tokens"].item() == 5


def test_unpacked_rows_are_padded_to_the_longest():
    items = [{"input_ids": torch.tensor([1, 2, 3]), "targets": torch.tensor([2, 3, 4]), "num_tokens": torch.tensor(3)},
             {"input_ids": torch.tensor([5]), "targets": torch.tensor([6]), "num_tokens": torch.tensor(1)}]
    batch = pad_collate(items, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [5, 0, 0]]
    assert batch["targets"].tolist() == [[2, 3, 4], [6, -100, -100]]
    assert batch["num_tokens"].tolist() == [3, 1]


def test_sources_mix_by_weight_and_every_format_loads(tmp_path, tokenizer_dir):
    chat = write_jsonl(tmp_path / "chat.jsonl", [qa(f"What is {i} + 1?", str(i + 1)) for i in range(40)])
    alpaca = tmp_path / "alpaca.json"  # a JSON list, as Alpaca ships
    alpaca.write_text(json.dumps([{"instruction": f"Double {i}.", "input": "", "output": str(2 * i)} for i in range(10)]))
    dm = InstructionDataModule(
        [{"path": str(chat), "weight": 1.0}, {"path": str(alpaca), "weight": 3.0, "format": "alpaca"}],
        tokenizer=tokenizer_dir, block_size=64, batch_size=2, val_fraction=0.1, train_examples=80,
    )
    dm.setup()
    assert dm.stats["chat.jsonl"]["val"] == 4 and dm.stats["alpaca.json"]["val"] == 1
    assert dm.stats["chat.jsonl"]["in mixture"] == 20 and dm.stats["alpaca.json"]["in mixture"] == 60
    # the packed epoch holds exactly the mixture's examples (samples are numbered source by source)
    packed = np.concatenate(dm.train_set.blocks)
    assert (packed < 40).sum() == 20 and (packed >= 40).sum() == 60
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "targets", "position_ids", "num_tokens"} and batch["input_ids"].shape == (2, 64)
    lengths = [len(dm.train_set.samples[i][0]) for i in packed]
    assert dm.packing_efficiency == pytest.approx(sum(lengths) / (len(dm.train_set) * 64))


def test_bad_arguments_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip', got 'ignore'"):
        InstructionDataModule(str(tmp_path), on_error="ignore")
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        InstructionDataModule([{"path": str(tmp_path), "format": "csv"}])
    with pytest.raises(ValueError, match="block_size must be a positive integer, got 0"):
        InstructionDataModule(str(tmp_path), block_size=0)


def sentencepiece_style_tokenizer(corpus_dir):
    """A BPE with SentencePiece's dummy prefix (`Metaspace(prepend_scheme="first")`, as Llama-2, Mistral and
    Gemma tokenizers have): a text that does not start with a special token gets a leading "▁"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lightning_llm.data.sources import Source

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"], show_progress=False)
    tok.train_from_iterator(Source(str(corpus_dir)).documents(), trainer=trainer)
    return use_chat_template(PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="</s>"))


def test_a_dummy_prefix_tokenizer_trains_on_the_tokens_inference_sees(corpus_dir):
    """The oracle is inference itself: the model is given `chat_prompt_ids` (the rendered prompt tokenized
    whole), so the training ids must be the rendered conversation tokenized whole, each answer's trained
    tokens starting right after its prompt. Tokenizing each answer on its own gave it a dummy-prefix "▁"
    token that inference never sees, in the answer and in every later turn's history."""
    from lightning_llm.data.instruct import chat_prompt_ids

    tok = sentencepiece_style_tokenizer(corpus_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."},
                {"role": "assistant", "content": "A lemon."}, {"role": "user", "content": "Another?"},
                {"role": "assistant", "content": "An apple, then."}]
    ids, trained = tokenize_conversation(tok, messages)
    assert ids == tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    for i in (2, 4):  # each answer: its prompt as inference tokenizes it, then the answer's tokens, trained
        prompt = chat_prompt_ids(tok, messages[:i])
        answer_end = len(tok(tok.apply_chat_template(messages[: i + 1], tokenize=False), add_special_tokens=False)["input_ids"])
        assert ids[: len(prompt)] == prompt and not trained[len(prompt) - 1] and all(trained[len(prompt) : answer_end])


# ChatML with the default system prompt that Qwen's templates add to a conversation without one.
CHATML_DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}" + CHATML
)


def test_an_answer_that_opens_the_conversation_trains_on_its_content_only(chat_tokenizer):
    """Hand-written masks: the header (and a template's own system prompt) before an opening answer is
    prompt, as it is before every later answer; it was trained on, the system prompt included."""
    messages = [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]
    ids, trained = tokenize_conversation(chat_tokenizer, messages)
    assert runs(chat_tokenizer, ids, trained) == [
        ("<|assistant|>\n", False), (f"Hello!{E}", True), (f"<|user|>\n2+2{E}<|assistant|>\n", False), (f"4{E}", True)]
    tok = copy.deepcopy(chat_tokenizer)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = CHATML_DEFAULT_SYSTEM
    ids, trained = tokenize_conversation(tok, messages)
    assert runs(tok, ids, trained) == [
        ("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n", False), ("Hello!<|im_end|>\n", True),
        ("<|im_start|>user\n2+2<|im_end|>\n<|im_start|>assistant\n", False), ("4<|im_end|>\n", True)]


@pytest.mark.parametrize("record", [
    {"instruction": "Add.", "input": "2 3", "output": "5", "system": "You add."},  # LLaMA-Factory's alpaca
    {"system": "You add.", "conversations": [{"from": "human", "value": "Add.\n\n2 3"}, {"from": "gpt", "value": "5"}]},
    {"system": "You add.", "prompt": "Add.\n\n2 3", "completion": "5"},
    # a dataset's row: every column, null or empty where unused, is no field of the record
    {"messages": [{"role": "user", "content": "Add.\n\n2 3", "weight": None}, {"role": "assistant", "content": "5", "name": ""}],
     "system": "You add.", "instruction": None, "history": [], "prompt": ""},
])
def test_a_records_system_field_is_its_system_message(record):
    """The top-level `system` of these dialects was dropped without a word; it is the conversation's system message."""
    assert to_messages(record) == [{"role": "system", "content": "You add."}, {"role": "user", "content": "Add.\n\n2 3"},
                                   {"role": "assistant", "content": "5"}]


def test_examples_kept_with_answers_cut_by_truncation_are_counted(tmp_path, tokenizer_dir):
    """A conversation whose second answer is past the block is kept with its first answer only: it was kept
    without a word. The oracle: the answer tokens of the same records in a block that holds them all."""
    turns = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "A lemon."},
             {"role": "user", "content": "word " * 30}, {"role": "assistant", "content": "An apple, then, " * 3}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": turns}] * 3 + [qa("What is 2 + 2?", "4")])
    targets = {}
    for block in (64, 1024):
        dm = InstructionDataModule(str(path), tokenizer=tokenizer_dir, block_size=block, batch_size=1, val_fraction=0, packing=False)
        dm.setup()
        targets[block] = sum(int((t != -100).sum()) for _, t in dm.train_set.samples)
    whole = dm.stats["chat.jsonl"]
    assert not any(key.startswith("truncated") for key in whole) and targets[64] < targets[1024]
    dm = InstructionDataModule(str(path), tokenizer=tokenizer_dir, block_size=64, batch_size=1, val_fraction=0, packing=False)
    dm.setup()
    assert dm.stats["chat.jsonl"]["truncated to the block: examples"] == 3 and dm.stats["chat.jsonl"]["dropped"] == 0
    assert dm.stats["chat.jsonl"]["truncated to the block: trained tokens cut"] == targets[1024] - targets[64]


def test_a_token_across_the_prompt_answer_boundary_keeps_the_prompt_inference_feeds(chat_tokenizer):
    """An answer opening with a newline after the template's "\\n": tokenized whole, one token ("\\n\\n   ")
    would span prompt and answer. The pieces are then tokenized alone, so the prompt is `chat_prompt_ids`."""
    from lightning_llm.data.instruct import chat_prompt_ids

    messages = [{"role": "user", "content": "Write it."}, {"role": "assistant", "content": "\n    return x"}]
    whole = chat_tokenizer(chat_tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    prompt = chat_prompt_ids(chat_tokenizer, messages[:1])
    assert whole[: len(prompt)] != prompt  # (the case: a token spans the boundary)
    ids, trained = tokenize_conversation(chat_tokenizer, messages)
    assert ids[: len(prompt)] == prompt and trained == [False] * len(prompt) + [True] * (len(ids) - len(prompt))
    assert chat_tokenizer.decode(ids[len(prompt):]) == f"\n    return x{E}"


CHATML_GENERATION = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_a_template_that_marks_its_answers_is_taken_at_its_word(tokenizer):
    """With `{% generation %}` the template says what the assistant generates: the newline after <|im_end|>,
    outside the block, was trained on too. Oracles: the runs by hand, and transformers' own assistant mask."""
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = CHATML_GENERATION
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]
    ids, trained = tokenize_conversation(tok, messages)
    assert runs(tok, ids, trained) == [
        ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello<|im_end|>", True), ("\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", False),
        ("Bye!<|im_end|>", True), ("\n", False)]
    hf = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(hf["input_ids"]) and trained == [bool(m) for m in hf["assistant_masks"]]
    assert all(tokenize_conversation(tok, messages, train_on_prompt=True)[1])


def test_an_instruction_folder_reads_its_json_files_and_names_the_others(tmp_path, tokenizer_dir):
    """A dataset folder as downloaded: its README.md was read as JSONL records, a stop at "README.md:1: not valid
    JSON" (or, with on_error='skip', its lines counted as bad records)."""
    folder = tmp_path / "dataset"
    (folder / "data").mkdir(parents=True)
    (folder / "README.md").write_text("# A dataset\n\nQuestions and answers.\n")
    (folder / "make.py").write_text("print('hi')\n")
    records = [qa(f"What is {i} + {i}?", str(2 * i)) for i in range(6)]
    write_jsonl(folder / "data" / "train.jsonl", records[:4])
    (folder / "data" / "more.json").write_text(json.dumps(records[4:]))
    dm = InstructionDataModule(str(folder), tokenizer=tokenizer_dir, block_size=64, batch_size=1, val_fraction=0)
    with pytest.warns(UserWarning, match=r"2 file\(s\) in .* are not read \(1 \.md, 1 \.py\): a folder is read for its files ending in \.json, \.jsonl"):
        dm.setup()
    assert dm.stats["dataset"]["examples"] == 6 and dm.stats["dataset"]["dropped"] == 0


def test_a_chat_template_file_is_read_and_a_path_that_is_none_is_refused(tmp_path, tokenizer_dir):
    """A template's path taken as the template rendered the same text for every conversation: every record
    stopped the run as having "no answer tokens". The oracle: the same masks as the template's text gives."""
    (tmp_path / "chatml.jinja").write_text(CHATML)
    record = qa("What is 1 + 1?", "2")
    write_jsonl(tmp_path / "chat.jsonl", [record] * 4)
    samples = []
    for template in (str(tmp_path / "chatml.jinja"), CHATML):
        dm = InstructionDataModule(str(tmp_path / "chat.jsonl"), tokenizer=tokenizer_dir, chat_template=template, block_size=64,
                                   batch_size=1, val_fraction=0, packing=False)
        dm.setup()
        samples.append([(ids.tolist(), targets.tolist()) for ids, targets in dm.train_set.samples])
    assert samples[0] == samples[1]
    with pytest.raises(ValueError, match=r"chat_template 'templates/chatml.jinja' is no file and no Jinja template"):
        InstructionDataModule(str(tmp_path / "chat.jsonl"), chat_template="templates/chatml.jinja")
