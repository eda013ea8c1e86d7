"""A conversation with a causal LM in the terminal: what `lightning-llm chat` runs.

Each turn renders the whole conversation with the tokenizer's chat template and its generation prompt
(`chat_prompt_ids`: the tokens an SFT run of this project trains the answers after), and the answer is
written token by token as it is generated (transformers' `TextStreamer`). A tokenizer without a chat
template gets a plain transcript ("User: ...", "Assistant: ..."), and the answer ends where the model
starts the next "User:" turn. An answer enters the conversation as it was shown, without the spaces
around it.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable
from typing import IO, Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from lightning_llm.data.instruct import Messages, chat_prompt_ids

# The transcript for a tokenizer without a chat template, and where a model's answer in it ends.
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
PLAIN_STOP = "\nUser:"
COMMANDS = {"/exit": "end the chat (so does end of input)", "/reset": "forget the conversation so far"}


def chat_tokenizer(tokenizer: PreTrainedTokenizerBase) -> tuple[PreTrainedTokenizerBase, str | None]:
    """`tokenizer` and no stop string when it has a chat template; else a copy with the plain transcript
    template and the stop string that ends an answer in it."""
    if tokenizer.chat_template:
        return tokenizer, None
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = PLAIN_TEMPLATE
    return plain, PLAIN_STOP


class ConversationTooLong(ValueError):
    """The prompt and the new tokens would not fit in the model's window."""


class AnswerStreamer(TextStreamer):
    """`TextStreamer` writing to `out`, holding back text that may be the start of `stop` (never shown)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, out: IO[str], stop: str | None = None) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out, self.stop = out, stop
        self.held, self.stopped = "", False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not self.stopped:
            text, self.held = self.held + text, ""
            if self.stop and self.stop in text:
                text, self.stopped = text[: text.index(self.stop)], True
            elif self.stop and not stream_end:
                keep = next((n for n in range(len(self.stop) - 1, 0, -1) if text.endswith(self.stop[:n])), 0)
                text, self.held = text[: len(text) - keep], text[len(text) - keep:]
            self.out.write(text)
        if stream_end:
            self.out.write("\n")
        self.out.flush()


def answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, messages: Messages, out: IO[str],
           stop: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 50) -> str:
    """The model's answer to `messages`, written to `out` as it is generated (greedy when temperature is 0)."""
    ids = chat_prompt_ids(tokenizer, messages)
    window = getattr(model.config, "max_position_embeddings", None)
    if window is not None and len(ids) + max_new_tokens > window:
        raise ConversationTooLong(f"the conversation is {len(ids)} tokens and --max_new_tokens {max_new_tokens} more would pass "
                         f"the model's window of {window}: /reset to start again, or ask for fewer new tokens")
    eos = model.generation_config.eos_token_id
    eos = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []), tokenizer.eos_token_id})
    sample = temperature > 0
    input_ids = torch.tensor([ids], device=model.device)
    output = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens, do_sample=sample,
        temperature=temperature if sample else None, top_k=top_k if sample else None,
        eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, streamer=AnswerStreamer(tokenizer, out, stop),
        **({"stop_strings": [stop], "tokenizer": tokenizer} if stop else {}),
    )
    text = tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)
    return text.split(stop)[0] if stop else text


def chat(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, turns: Iterable[str], out: IO[str],
         system: str | None = None, **generation: Any) -> Messages:
    """Answer each line of `turns` (a user's message, or one of `COMMANDS`) until `/exit` or their end;
    returns the conversation. `generation`: `answer`'s options."""
    tokenizer, stop = chat_tokenizer(tokenizer)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    for line in turns:
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            messages = list(start)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        try:
            reply = answer(model, tokenizer, messages, out, stop, **generation)
        except ConversationTooLong as err:  # the chat goes on: /reset, or a shorter message
            messages.pop()
            print(f"lightning-llm chat: {err}", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": reply.strip()})
    return messages
