"""`lightning-llm chat`: two turns piped through stdin against the conversation built by hand (the chat template,
or the plain transcript of a tokenizer without one) and generated greedily."""

import io
import sys

import pytest
import torch

from eval_support import one_thread, small_tokenizer, tiny_model
from lightning_llm.chat import AnswerStreamer
from lightning_llm.cli import main
from lightning_llm.data.instruct import use_chat_template
from lightning_llm.export import save_pretrained_atomic

pytestmark = pytest.mark.usefixtures("one_thread")

TURNS = ["def add(a, b):", "and the class around it?"]
NEW_TOKENS = 12


def greedy(model, tokenizer, prompt: str, stop: str | None = None) -> str:
    """The oracle: a prompt's greedy continuation, up to EOS or NEW_TOKENS, cut at `stop` by hand."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return text.split(stop)[0] if stop else text


def run_chat(tmp_path, monkeypatch, capsys, tokenizer):
    model = tiny_model(tokenizer)
    export = save_pretrained_atomic(model, tmp_path / "hf", tokenizer)
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(TURNS) + "\n/exit\nnever read\n"))
    main(["chat", "--model", str(export), "--max_new_tokens", str(NEW_TOKENS)])
    captured = capsys.readouterr()
    return model, captured.out, captured.err


def test_chat_follows_the_chat_template_turn_after_turn(tmp_path, monkeypatch, capsys):
    tokenizer = use_chat_template(small_tokenizer())  # the project's default template (its role tokens added)
    model, out, err = run_chat(tmp_path, monkeypatch, capsys, tokenizer)

    def by_hand(messages):
        return greedy(model, tokenizer, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    first = by_hand([{"role": "user", "content": TURNS[0]}])
    second = by_hand([{"role": "user", "content": TURNS[0]}, {"role": "assistant", "content": first.strip()},
                      {"role": "user", "content": TURNS[1]}])
    assert out == f"{first}\n{second}\n"  # streamed answers, one after the other; /exit ends the chat
    assert second != by_hand([{"role": "user", "content": TURNS[1]}]), "the second answer must depend on the first turn"
    assert "no chat template" not in err

    # A turn that would run past the model's window is refused with the fix, and the chat goes on.
    window = model.config.max_position_embeddings
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(TURNS) + "\n"))
    main(["chat", "--model", str(tmp_path / "hf"), "--max_new_tokens", str(window)])
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count(f"would pass the model's window of {window}: /reset to start again") == 2


def test_chat_without_a_template_says_so_and_uses_a_plain_transcript(tmp_path, monkeypatch, capsys):
    tokenizer = small_tokenizer()
    assert not tokenizer.chat_template
    model, out, err = run_chat(tmp_path, monkeypatch, capsys, tokenizer)
    first = greedy(model, tokenizer, f"User: {TURNS[0]}\nAssistant:", stop="\nUser:")
    second = greedy(model, tokenizer, f"User: {TURNS[0]}\nAssistant: {first.strip()}\nUser: {TURNS[1]}\nAssistant:",
                    stop="\nUser:")
    assert out == f"{first}\n{second}\n"
    assert "has no chat template; the conversation is a plain transcript" in err


def test_streamed_answer_stops_before_the_next_turn():
    out = io.StringIO()
    streamer = AnswerStreamer(small_tokenizer(), out, stop="\nUser:")
    for piece in ("Four", ".\n", "Us", "er: and five?"):  # the model goes on with a turn of the user's
        streamer.on_finalized_text(piece)
        assert "\n" not in out.getvalue()  # "\n" may start the stop string: held back
    streamer.on_finalized_text("", stream_end=True)
    assert out.getvalue() == "Four.\n"
    out = io.StringIO()
    streamer = AnswerStreamer(small_tokenizer(), out, stop="\nUser:")
    for piece in ("a\n", "b"):  # a newline that is not the start of a turn is shown
        streamer.on_finalized_text(piece)
    streamer.on_finalized_text("", stream_end=True)
    assert out.getvalue() == "a\nb\n"
