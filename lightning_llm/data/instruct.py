"""InstructionDataModule: chat-formatted supervised finetuning data, with the loss on answer tokens only.

A record in one of the common formats (chat `messages`, Alpaca, ShareGPT, prompt/completion) becomes
a list of messages, rendered by the tokenizer's chat template or, for a tokenizer without one, by the
project's default template (whose role tokens are added to the tokenizer). The tokens of assistant
answers are the targets; every other token (system, user, template markup) is -100.

Examples are packed whole into blocks: position ids restart at 0 at each example, which is how
transformers' masking builds a block-diagonal causal mask for SDPA and eager attention (it does so
when position ids restart and no attention mask is given), and how a varlen attention kernel finds the
boundaries. No token attends across examples, so a packed batch computes the same loss as the
examples padded one per row.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import jinja2
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from lightning_llm.data.pretrain import PretrainDataModule, mixture_index
from lightning_llm.data.sources import Source, decode_file
from lightning_llm.data.tokenizer import load_tokenizer
from lightning_llm.data.tokens import available_cpus, batches, map_in_order

log = logging.getLogger(__name__)

FORMATS = ("auto", "messages", "alpaca", "sharegpt", "prompt_completion")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

# The default template (Zephyr's layout): a role token, a newline, the content, and EOS to end each
# turn, so a tuned model stops where generation already stops. Only the role tokens are new.
DEFAULT_ROLE_TOKENS = [f"<|{role}|>" for role in ROLES]
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + '; the default template knows system, user, assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

Messages = list[dict[str, str]]

# The field that marks each format, in the order `detect_format` tries them.
FORMAT_FIELDS = {"messages": "messages", "conversations": "sharegpt", "instruction": "alpaca", "prompt": "prompt_completion"}
# Fields that other tools' dialects of these formats use to carry part of the conversation or of its loss.
# Left unread they would train on another conversation than the record holds, so a record with one is refused
# (a top-level `system` is read: it becomes the system message).
UNREAD_RECORD_FIELDS = ("history", "tools")
UNREAD_TURN_FIELDS = ("weight", "train", "loss", "mask", "name", "tool_calls", "function_call", "tool_call_id",
                      "reasoning_content", "thinking")


class BadRecord(ValueError):
    """A record that cannot become a training example: `reason` is its kind (dropped records are counted by it)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason, self.detail = reason, detail

    def __reduce__(self):  # (a tokenizing worker sends it back to the parent: rebuilt from both parts, not the message)
        return self.__class__, (self.reason, self.detail)


class Overlong(BadRecord):
    """An example that does not fit the block: a property of the block size, always a counted skip."""


@dataclass
class InstructionSource(Source):
    """One instruction file (JSONL, or JSON holding a list), directory of them, or `hf:<dataset>[:<split>]`
    (with `config`, `split` and `streaming` as in `Source`).

    Args:
        path: the file, directory, glob or dataset.
        weight: share of the mixture's training examples (normalised over sources).
        format: "auto" (detected per record), "messages", "alpaca", "sharegpt" or "prompt_completion".
        name: label for logs.
        encoding, errors: how the files' bytes become text, as in `Source`.
    """

    format: str = "auto"
    # A folder's instruction files; its README.md or scripts are no records.
    read_suffixes: ClassVar[tuple[str, ...]] = (".json", ".jsonl")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.format not in FORMATS:
            raise ValueError(f"source {self.path!r}: unknown format {self.format!r}; use one of {', '.join(FORMATS)}")

    def records(self) -> Iterator[tuple[str, Any]]:
        """(location, record) pairs in file order; a line that is not JSON comes as the `BadRecord` to report."""
        if self.is_hub:
            yield from self.hub_rows()
            return
        self.replaced = 0
        for f in self.files():
            text, replaced = decode_file(f, self.encoding, self.errors)
            self.replaced += replaced
            if f.suffix == ".json":
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as err:  # one document: nothing of it can be kept
                    raise BadRecord(f"{f}:{err.lineno}: not valid JSON", err.msg) from err
                if not isinstance(data, list):
                    raise BadRecord(f"{f}: a .json instruction file must hold a list of records", f"got {type(data).__name__}")
                yield from ((f"{f}[{i}]", record) for i, record in enumerate(data))
                continue
            # Split on newlines only: a JSON string may hold U+2028, which str.splitlines would cut at.
            for lineno, line in enumerate(text.split("\n"), 1):
                if not line.strip():
                    continue
                try:
                    yield f"{f}:{lineno}", json.loads(line)
                except json.JSONDecodeError as err:
                    yield f"{f}:{lineno}", BadRecord("not valid JSON", err.msg)


# -- records to messages ---------------------------------------------------------------------------


def _given(record: dict[str, Any], field: str) -> bool:
    """Whether `record` holds a value at `field` (a dataset's row has every column, null or empty where unused;
    0 and False are values)."""
    value = record.get(field)
    return value is not None and not (isinstance(value, str | list | dict) and not value)


def detect_format(record: dict[str, Any]) -> str:
    # (a format's field that is there but empty still names the format, whose reading then says what is missing)
    found = [field for field in FORMAT_FIELDS if _given(record, field)] or [field for field in FORMAT_FIELDS if field in record][:1]
    if len(found) > 1:
        raise BadRecord("fields of several formats", f"{', '.join(map(repr, found))}; pass the source's format "
                        f"({', '.join(FORMAT_FIELDS[f] for f in found)}) to say which to read")
    if found:
        return FORMAT_FIELDS[found[0]]
    raise BadRecord(
        "unknown record format",
        f"fields {sorted(record)}; expected 'messages', 'conversations', 'instruction'/'output' or 'prompt'/'completion'",
    )


def _text(record: dict[str, Any], field: str, required: bool = True) -> str:
    value = record.get(field)
    if value is None and not required:
        return ""
    if value is None:
        raise BadRecord("missing field", repr(field))
    if not isinstance(value, str):
        raise BadRecord("field is not a string", f"{field!r} is {type(value).__name__}")
    return value


def _turns(turns: Any, field: str, role_key: str, content_key: str, roles: dict[str, str]) -> Messages:
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise BadRecord("missing field" if turns is None else "malformed turns", f"{field!r} must be a list of objects with {role_key!r} and {content_key!r}")
    messages = []
    for i, turn in enumerate(turns):
        unread = [key for key in UNREAD_TURN_FIELDS if _given(turn, key)]
        if unread:
            raise BadRecord("unsupported turn field", f"{field}[{i}] has {', '.join(map(repr, unread))}, which would not be read "
                            "(per-turn loss weights, names, tool calls and reasoning are not supported); remove it")
        role = turn.get(role_key)
        if role not in roles:
            raise BadRecord("unknown role", f"{role!r} in {field}[{i}]; known roles: {', '.join(roles)}")
        messages.append({"role": roles[role], "content": _text(turn, content_key)})
    return messages


def to_messages(record: Any, format: str = "auto") -> Messages:
    """A record of any supported format as chat messages; raises `BadRecord` on what cannot be trained on."""
    if not isinstance(record, dict):
        raise BadRecord("not a JSON object", type(record).__name__)
    format = detect_format(record) if format == "auto" else format
    if format == "messages":
        messages = _turns(record.get("messages"), "messages", "role", "content", {r: r for r in ROLES})
    elif format == "sharegpt":
        messages = _turns(record.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    elif format == "alpaca":
        instruction, context = _text(record, "instruction"), _text(record, "input", required=False)
        prompt = f"{instruction}\n\n{context}" if context.strip() else instruction
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record, "output")}]
    elif format == "prompt_completion":
        messages = [{"role": "user", "content": _text(record, "prompt")}, {"role": "assistant", "content": _text(record, "completion")}]
    else:
        raise ValueError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}")
    unread = [key for key in UNREAD_RECORD_FIELDS if _given(record, key)]
    if unread:
        raise BadRecord("unsupported field", f"{', '.join(map(repr, unread))} would not be read; write the conversation "
                        "as 'messages' (earlier turns as user/assistant messages), without tools")
    system = _text(record, "system", required=False)
    if system.strip():
        if messages and messages[0]["role"] == "system":
            raise BadRecord("two system prompts", "the record's 'system' field and a system turn; keep one")
        messages = [{"role": "system", "content": system}, *messages]
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers:
        raise BadRecord("no assistant answer to train on")
    if any(not m["content"].strip() for m in answers):
        raise BadRecord("empty answer")
    return messages


# -- chat template and label masks -----------------------------------------------------------------


def template_text(chat_template: str | None) -> str | None:
    """`chat_template` as a template: the text of the file it names (a `.jinja` file, as vLLM and transformers
    take), else itself, which must then be Jinja. A path taken as the template would render the same constant
    text for every conversation, and every record would be refused as having no answer tokens."""
    if chat_template is None or chat_template == "default":
        return chat_template
    if not isinstance(chat_template, str):
        raise ValueError(f"chat_template must be a Jinja template, a file holding one, 'default' or None; got {chat_template!r}")
    if "\n" not in chat_template and Path(chat_template).expanduser().is_file():
        return Path(chat_template).expanduser().read_text(encoding="utf-8")
    if "{{" not in chat_template and "{%" not in chat_template:
        raise ValueError(f"chat_template {chat_template!r} is no file and no Jinja template (it has no {{{{ }}}} or {{% %}}); "
                         "give the template's text, a file holding it, or 'default'")
    return chat_template


def use_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """Give `tokenizer` its chat template: `chat_template`, else its own, else the default ("default" forces it).

    The default template's role tokens are added as special tokens (a model trained with this
    tokenizer needs embeddings for them); adding them again is a no-op.
    """
    if chat_template == "default" or (chat_template is None and not tokenizer.chat_template):
        tokenizer.add_tokens(DEFAULT_ROLE_TOKENS, special_tokens=True)
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    elif chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def _render(tokenizer: PreTrainedTokenizerBase, messages: Messages, add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as err:
        raise BadRecord("the chat template rejects the conversation", str(err)) from err


def answer_segments(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_answer) pieces.

    An answer is what the template adds for an assistant message after the generation prompt: the
    conversation up to that message rendered with `add_generation_prompt` ends where the answer
    starts, and rendered with the message ends where it stops (its end-of-turn markup included, so
    the model learns to stop). An answer that opens the conversation has for prompt what the template
    renders before its content (`_opening`): its role header, never trained on. This works for any template that renders a conversation's prefix as
    a prefix of its text; one that does not is reported rather than guessed at.
    """
    full = _render(tokenizer, messages)
    segments, pos = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else _opening(tokenizer)
        upto = _render(tokenizer, messages[: i + 1])
        if not (upto.startswith(prompt) and full.startswith(upto) and len(prompt) >= pos):
            raise BadRecord(
                "the chat template does not render a conversation's start as a prefix of it",
                f"at message {i}; the answer tokens cannot be located",
            )
        segments += [(full[pos : len(prompt)], False), (upto[len(prompt) :], True)]
        pos = len(upto)
    segments.append((full[pos:], False))
    return [(text, is_answer) for text, is_answer in segments if text]


# Stands in for the content of an answer that opens a conversation (transformers renders no empty one).
ANSWER_PLACEHOLDER = "ANSWER_PLACEHOLDER_7f3a9c"


def _opening(tokenizer: PreTrainedTokenizerBase) -> str:
    """What the template renders before the content of an answer that opens the conversation (its role
    header, and any system prompt the template adds itself): the prompt of that answer."""
    text = _render(tokenizer, [{"role": "assistant", "content": ANSWER_PLACEHOLDER}])
    if ANSWER_PLACEHOLDER not in text:
        raise BadRecord("the chat template does not render an answer that opens a conversation as its text",
                        "the answer tokens cannot be located; start the conversation with a user message")
    return text[: text.index(ANSWER_PLACEHOLDER)]


# A template's own statement of what the assistant generates (transformers' `{% generation %}` block).
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def marked_answers(tokenizer: PreTrainedTokenizerBase, messages: Messages, train_on_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids and trained flags where the template marks its answers with `{% generation %}`: transformers'
    own assistant mask, so the tokens trained are the ones the template's author marked (a ChatML template's
    newline after the end of turn, outside the block, is not one of them)."""
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    except jinja2.TemplateError as err:
        raise BadRecord("the chat template rejects the conversation", str(err)) from err
    return list(out["input_ids"]), [train_on_prompt or bool(flag) for flag in out["assistant_masks"]]


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: Messages, train_on_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is trained on.

    A template that marks its answers with `{% generation %}` says itself what is trained (`marked_answers`;
    fast tokenizers, which give the character offsets that mask needs). Otherwise the answers are found by
    `answer_segments`, and the ids are the ones inference sees: the whole rendered text tokenized at once, as `chat_prompt_ids`
    tokenizes a conversation's history, with each token labelled by the piece its first character is in.
    Tokenizing each piece on its own would differ for a tokenizer that marks the start of a text
    (SentencePiece's dummy prefix, `Metaspace(prepend_scheme="first")` in Llama-2, Mistral and Gemma
    tokenizers): every answer would start with a "▁" token that inference never feeds nor expects. Where
    a token spans a prompt/answer boundary (a tokenizer that merges across it), or the tokenizer gives no
    character offsets (a slow one), each piece is tokenized on its own: the prompt then ends exactly as the
    tokens inference feeds (the template with the generation prompt, tokenized alone) end.
    """
    template = tokenizer.chat_template
    if tokenizer.is_fast and isinstance(template, str) and GENERATION_TAG.search(template):
        return marked_answers(tokenizer, messages, train_on_prompt)
    segments = answer_segments(tokenizer, messages)
    flags = [train_on_prompt or is_answer for _, is_answer in segments]
    if tokenizer.is_fast:
        starts = np.cumsum([0] + [len(text) for text, _ in segments[:-1]])
        encoded = tokenizer("".join(text for text, _ in segments), add_special_tokens=False, return_offsets_mapping=True)
        offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        piece = np.searchsorted(starts, offsets[:, 0], side="right") - 1  # the piece each token starts in
        next_start = np.append(starts, np.iinfo(np.int64).max)[piece + 1]
        if not (offsets[:, 1] > next_start).any():  # no token runs on into the next piece
            return encoded["input_ids"], [flags[i] for i in piece]
    pieces = tokenizer([text for text, _ in segments], add_special_tokens=False)["input_ids"]
    return [t for piece in pieces for t in piece], [flag for piece, flag in zip(pieces, flags) for _ in piece]


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> list[int]:
    """The tokens a model is given to answer `messages`: the template with the generation prompt."""
    return tokenizer(_render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def training_sample(ids: list[int], trained: list[bool], block_size: int, truncate: bool) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, targets) of one example: targets are the next tokens where they are trained, else -100.

    An example longer than `block_size` is cut to it (`truncate`) or refused; either way an example
    left with no trained target raises `Overlong` (or `BadRecord`), so it is dropped and counted, never
    kept without answer tokens.
    """
    if len(ids) - 1 > block_size:
        if not truncate:
            raise Overlong("longer than the block", f"{len(ids) - 1} > {block_size} tokens")
        ids, trained = ids[: block_size + 1], trained[: block_size + 1]
    ids_arr = np.asarray(ids, dtype=np.int64)
    targets = np.where(np.asarray(trained[1:], dtype=bool), ids_arr[1:], -100)
    if not (targets != -100).any():
        if len(ids) - 1 == block_size:
            raise Overlong("no answer tokens left after truncation to the block")
        raise BadRecord("no answer tokens")
    return ids_arr[:-1], targets


# Records per batch sent to a tokenizing worker: enough that sending it costs little beside rendering and
# tokenizing its conversations, few enough that a small file still keeps every worker busy.
RECORDS_PER_BATCH = 256

Sample = tuple[np.ndarray, np.ndarray]


def tokenize_records(batch: list[tuple[str, Any]], tokenizer: PreTrainedTokenizerBase, format: str,
                     train_on_prompt: bool, block_size: int, truncate: bool) -> list[tuple[str, Sample | BadRecord, int]]:
    """Each (location, record) as its training sample and the trained targets truncation cut from it, or as
    the `BadRecord` it is: a tokenizing worker's task (`tokens.map_in_order`), so the parent raises, warns
    and counts in the records' order."""
    out: list[tuple[str, Sample | BadRecord, int]] = []
    for location, record in batch:
        try:
            if isinstance(record, BadRecord):
                raise record
            ids, trained = tokenize_conversation(tokenizer, to_messages(record, format), train_on_prompt)
            out.append((location, training_sample(ids, trained, block_size, truncate), sum(trained[block_size + 1 :])))
        except BadRecord as err:
            out.append((location, err, 0))
    return out


# -- packing ---------------------------------------------------------------------------------------


def pack_examples(lengths: np.ndarray, block_size: int, seed: int) -> list[np.ndarray]:
    """Indices of the examples in each block: best-fit decreasing, no block over `block_size` tokens.

    Longest examples first, each into the fullest block that still has room for it (a sorted list
    of free capacities makes that a binary search); ties in length are broken in a seeded random
    order, so examples of one source do not cluster.
    """
    if len(lengths) and lengths.max() > block_size:
        raise ValueError(f"an example of {lengths.max()} tokens does not fit a block of {block_size}")
    order = np.random.default_rng(seed).permutation(len(lengths))
    order = order[np.argsort(-lengths[order], kind="stable")]
    blocks: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, block), sorted
    for i in order:
        length = int(lengths[i])
        j = bisect.bisect_left(free, (length, -1))
        if j == len(free):
            blocks.append([])
            room, b = block_size, len(blocks) - 1
        else:
            room, b = free.pop(j)
        blocks[b].append(int(i))
        if room - length > 0:
            bisect.insort(free, (room - length, b))
    return [np.asarray(block) for block in blocks]


class PackedExamples(Dataset):
    """Blocks of whole examples, `block_size` tokens each.

    Each item: `input_ids`, `targets`, `position_ids` (restarting at 0 per example) and `num_tokens`
    (tokens that are not padding). The padding at the end is a segment of its own, with its own
    positions from 0 and -100 targets, so it is masked like another example and needs no attention mask.
    """

    def __init__(self, samples: list[tuple[np.ndarray, np.ndarray]], blocks: list[np.ndarray], block_size: int, pad_id: int) -> None:
        self.samples, self.blocks, self.block_size, self.pad_id = samples, blocks, block_size, pad_id

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        parts = [self.samples[j] for j in self.blocks[i]]
        used = sum(len(ids) for ids, _ in parts)
        pad = self.block_size - used
        input_ids = np.concatenate([ids for ids, _ in parts] + [np.full(pad, self.pad_id)])
        targets = np.concatenate([t for _, t in parts] + [np.full(pad, -100)])
        position_ids = np.concatenate([np.arange(len(ids)) for ids, _ in parts] + [np.arange(pad)])
        return {"input_ids": torch.from_numpy(input_ids), "targets": torch.from_numpy(targets),
                "position_ids": torch.from_numpy(position_ids), "num_tokens": torch.tensor(used)}


class SingleExamples(Dataset):
    """One example per item, unpadded (`pad_collate` pads a batch to its longest example)."""

    def __init__(self, samples: list[tuple[np.ndarray, np.ndarray]], index: np.ndarray) -> None:
        self.samples, self.index = samples, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, targets = self.samples[self.index[i]]
        return {"input_ids": torch.from_numpy(ids), "targets": torch.from_numpy(targets), "num_tokens": torch.tensor(len(ids))}


def pad_collate(items: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest: inputs with `pad_id`, targets with -100.

    Unpacked rows carry no position ids and no attention mask: each row starts at position 0, and
    under causal attention no real token attends to the padding after it, so the plain causal path
    (SDPA's `is_causal`) is exact.
    """
    longest = max(len(item["input_ids"]) for item in items)
    fill = {"input_ids": pad_id, "targets": -100, "position_ids": 0}
    batch = {}
    for key in items[0]:
        if key in fill:
            rows = [torch.nn.functional.pad(item[key], (0, longest - len(item[key])), value=fill[key]) for item in items]
        else:
            rows = [item[key] for item in items]
        batch[key] = torch.stack(rows)
    return batch


# -- the data module -------------------------------------------------------------------------------


class InstructionDataModule(PretrainDataModule):
    """Chat-formatted SFT examples from a weighted mixture of instruction files, packed or padded.

    Args:
        sources: a path, or a list of sources (`{path, weight, format, name}`, see `InstructionSource`)
            that mix by weight, measured in examples.
        tokenizer: a local tokenizer directory or a hub id; `None` takes the tokenizer of the model
            being tuned (`InstructionTuningModule` loads it from its export, hub id or checkpoint).
        chat_template: a Jinja chat template, or a file holding one (`.jinja`); `None` uses the tokenizer's
            own, or the default template for a tokenizer without one; "default" always uses the default template.
        block_size: tokens per training sequence.
        batch_size: sequences per batch on each data-parallel rank.
        packing: pack several examples per block (position ids restart per example); otherwise one
            example per row, padded to the longest in the batch.
        train_on_prompt: targets on every token, not only on the answers.
        truncate: cut examples longer than `block_size` (dropped if no answer token is left); otherwise
            drop them. Dropped examples are counted in `stats`.
        on_error: "raise" stops at the first bad record (malformed JSON, missing fields, empty answer,
            unknown role) naming its file and line; "skip" drops it and counts it.
        val_fraction: share of each source's examples held out for validation.
        max_val_examples: cap on validation examples (evenly spaced), to keep validation quick.
        train_examples: examples per training epoch before packing; `None` is the sum over sources.
        seed: seeds the split, the mixture, the packing and the shuffling.
        num_workers: DataLoader workers.
        tokenize_workers: processes that render and tokenize the records; `None` is this process's share of
            the available CPUs (all of them, divided by the devices per node under a multi-device Trainer).
            The examples are the same, in the same order, for any number.
        allow_data_change: as in `PretrainDataModule`.
    """

    source_class = InstructionSource
    DATA_ORDER = (*PretrainDataModule.DATA_ORDER, "chat_template", "packing", "train_on_prompt", "truncate", "train_examples")

    def __init__(
        self,
        sources: str | list[dict],
        tokenizer: str | None = None,
        chat_template: str | None = None,
        block_size: int = 1024,
        batch_size: int = 8,
        packing: bool = True,
        train_on_prompt: bool = False,
        truncate: bool = True,
        on_error: Literal["raise", "skip"] = "raise",
        val_fraction: float = 0.05,
        max_val_examples: int | None = 256,
        train_examples: int | None = None,
        seed: int = 1234,
        num_workers: int = 0,
        tokenize_workers: int | None = None,
        allow_data_change: bool = False,
    ) -> None:
        super().__init__(sources=sources, tokenizer=tokenizer, block_size=block_size, batch_size=batch_size,
                         val_fraction=val_fraction, seed=seed, num_workers=num_workers, tokenize_workers=tokenize_workers,
                         allow_data_change=allow_data_change)
        self.tokenize_workers_wanted = tokenize_workers  # (validated above; None is resolved per process at setup)
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        for name, value in (("max_val_examples", max_val_examples), ("train_examples", train_examples)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        self.chat_template, self.packing, self.train_on_prompt = template_text(chat_template), packing, train_on_prompt
        self.truncate, self.on_error = truncate, on_error
        self.max_val_examples, self.train_examples = max_val_examples, train_examples

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            if self.tokenizer_spec is not None:
                tokenizer = load_tokenizer(self.tokenizer_spec)
            else:
                module = self.trainer.lightning_module if self.trainer is not None else None
                tokenizer = getattr(module, "tokenizer", None)
                if tokenizer is None:
                    raise ValueError(
                        "InstructionDataModule has no tokenizer: pass tokenizer=<directory or hub id>, or tune a model "
                        "that carries one (an export directory, a hub id or a checkpoint)"
                    )
            self._tokenizer = use_chat_template(tokenizer, self.chat_template)
            self.collate_fn = partial(pad_collate, pad_id=self._tokenizer.pad_token_id)
        return self._tokenizer

    def prepare_data(self) -> None:
        """Nothing to fetch ahead: every rank reads and tokenizes the records in `setup`."""

    @property
    def tokenize_processes(self) -> int:
        """`tokenize_workers`, or for None this process's share of the CPUs: every process on a node
        tokenizes its own copy of the records (in `setup`), so N devices per node split the CPUs N ways."""
        if self.tokenize_workers_wanted is not None:
            return self.tokenize_workers_wanted
        per_node = self.trainer.num_devices if self.trainer is not None else 1
        return max(1, available_cpus() // per_node)

    def read_source(self, source: InstructionSource) -> tuple[list[Sample], Counter, Counter]:
        """The training samples of one source, the count of records dropped, by reason, and what truncation
        cut from the samples kept ("examples" cut, trained "targets" lost).

        `tokenize_processes` processes render and tokenize the records (`tokens.map_in_order`); the results
        come back in the records' order, so the samples, the first error and the counts are the ones a
        single process gives."""
        samples, dropped, truncated = [], Counter(), Counter()
        workers = self.tokenize_processes
        records = batches(source.records(), max_chars=None, max_docs=RECORDS_PER_BATCH)
        results = map_in_order(tokenize_records, records, workers, tokenizer=self.tokenizer, format=source.format,
                               train_on_prompt=self.train_on_prompt, block_size=self.block_size, truncate=self.truncate)
        # closing: a record that stops the run stops the workers now, not when its traceback is freed
        with closing(results), tqdm(desc=f"tokenizing {source.name} ({workers} process{'es' if workers > 1 else ''})",
                                    unit=" records", disable=None) as bar:
            for batch in results:
                for location, outcome, cut in batch:
                    if not isinstance(outcome, BadRecord):
                        samples.append(outcome)
                        truncated.update({"examples": 1, "targets": cut} if cut else {})
                        continue
                    if self.on_error == "raise" and not isinstance(outcome, Overlong):
                        raise BadRecord(f"{location}: {outcome}", "pass on_error='skip' to drop such records") from outcome
                    if dropped[outcome.reason] == 0:
                        rank_zero_warn(f"{location}: {outcome}; dropping such records and counting them")
                    dropped[outcome.reason] += 1
                bar.update(len(batch))
        return samples, dropped, truncated

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.check_model_fits()
        self.warn_unread_files()
        samples: list[tuple[np.ndarray, np.ndarray]] = []
        train_index, val_index = [], []
        rng = np.random.default_rng(self.seed)
        for source in self.sources:
            own, dropped, truncated = self.read_source(source)
            if not own:
                raise ValueError(f"instruction source {source.name!r} has no usable example (dropped: {dict(dropped)})")
            index = len(samples) + rng.permutation(len(own))
            n_val = max(1, round(self.val_fraction * len(own))) if self.val_fraction > 0 and len(own) > 1 else 0
            samples += own
            val_index.append(index[:n_val])
            train_index.append(index[n_val:])
            self.stats[source.name] = {"examples": len(own), "dropped": sum(dropped.values()), **{f"dropped: {k}": v for k, v in dropped.items()},
                                       "train": len(index) - n_val, "val": n_val}
            if truncated:  # kept with part of their answers cut (truncate=False drops them): said, as the dropped ones are
                self.stats[source.name].update({"truncated to the block: examples": truncated["examples"],
                                                "truncated to the block: trained tokens cut": truncated["targets"]})
            if source.errors == "replace":
                self.stats[source.name]["replaced characters (errors='replace')"] = source.replaced
        total = self.train_examples or sum(len(t) for t in train_index)
        mixture = mixture_index(train_index, [s.weight for s in self.sources], total, self.seed)
        for s, source in enumerate(self.sources):
            self.stats[source.name]["in mixture"] = int((mixture[:, 0] == s).sum())
        val = np.concatenate(val_index)
        if self.max_val_examples is not None and len(val) > self.max_val_examples:
            val = val[np.linspace(0, len(val) - 1, self.max_val_examples).round().astype(int)]
        self.train_set, self.val_set = self._dataset(samples, mixture[:, 1]), self._dataset(samples, val)
        if len(self.train_set) < self.batch_size:
            unit = "packed blocks" if self.packing else "examples"
            raise ValueError(f"{len(self.train_set)} training {unit}, fewer than one batch of batch_size={self.batch_size}; "
                             "add examples, raise train_examples or lower batch_size")
        self._log_stats(len(val))

    def _dataset(self, samples: list[tuple[np.ndarray, np.ndarray]], index: np.ndarray) -> Dataset:
        if not self.packing:
            return SingleExamples(samples, index)
        lengths = np.asarray([len(samples[i][0]) for i in index], dtype=np.int64)
        blocks = [index[b] for b in pack_examples(lengths, self.block_size, self.seed)]
        return PackedExamples(samples, blocks, self.block_size, self.tokenizer.pad_token_id)

    @property
    def packing_efficiency(self) -> float | None:
        """Fraction of the packed training blocks' tokens that are not padding (None without packing)."""
        if not isinstance(self.train_set, PackedExamples):
            return None
        used = sum(len(self.train_set.samples[i][0]) for block in self.train_set.blocks for i in block)
        return used / (len(self.train_set) * self.block_size)

    def _log_stats(self, n_val: int) -> None:
        rows = [f"{'source':<24}{'examples':>10}{'dropped':>9}{'train':>9}{'val':>7}{'in mixture':>12}"]
        for name, st in self.stats.items():
            rows.append(f"{name:<24}{st['examples']:>10,}{st['dropped']:>9,}{st['train']:>9,}{st['val']:>7,}{st['in mixture']:>12,}")
            rows += [f"    {key}: {value}" for key, value in st.items() if key.startswith(("dropped: ", "truncated ", "replaced "))]
        if self.packing:
            rows.append(f"{len(self.train_set)} packed blocks of {self.block_size} tokens per epoch, "
                        f"{self.packing_efficiency:.1%} of their tokens are examples (not padding); {n_val} validation examples")
        else:
            rows.append(f"{len(self.train_set)} training examples per epoch, one per row; {n_val} validation examples")
        rank_zero_info("\n".join(rows))
