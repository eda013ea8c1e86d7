"""An lm-eval model over a live Hugging Face causal LM and its tokenizer: benchmarks on the model being trained.

`LightningLM` subclasses lm-eval's `TemplateLM`, so tokenizing a (context, continuation) pair is
lm-eval's own code (trailing spaces of the context move to the continuation, the whole string is
encoded and split at the context's length, an empty context becomes the prefix token). Requests are
ordered and batched by lm-eval's `Collator` exactly as its `HFLM` does (longest first; multiple
choice requests that differ only in a one-token answer share one forward pass), so results equal
HFLM's on the same weights, without exporting and reloading the model.

What differs from HFLM, for speed: the language-model head and the log-softmax run only on the
positions being scored (`logits_to_keep`), not on every position of every padded row.

Under torch.distributed each rank scores its share of the requests (lm-eval splits them over the
ranks of `group`, by default all of them) and the results are gathered on the group's first rank.
Under tensor parallelism the ranks of one tensor-parallel group hold slices of one model and must feed
it the same inputs: `group` is then the data-parallel group, and each tensor-parallel rank evaluates
its data-parallel coordinate's share (lm-eval returns the results on global rank 0 only). When the parameters are sharded (ZeRO-3 / FSDP2), every forward pass
all-gathers them, so every rank makes the same number of forward passes and `generate` calls, and
generation runs with `synced_gpus` (a rank whose sequences are done keeps stepping until all are);
the evaluation must then run inside the forward of the root sharded module (`within_root_forward`),
whose hooks gather the parameters that the root holds itself. A strategy may ask for the same lockstep, or
for generation without a KV cache (a pipeline, whose forward runs each whole sequence through its stages),
through `calls` (`lightning_llm.protocols.EvaluationCalls`, what its `evaluating` context yields).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text, resolve_max_length
from lm_eval.models.utils_hf import stop_sequences_criteria
from torch import nn
from torch.distributed.fsdp import FSDPModule
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_llm.protocols import EvaluationCalls, restore_forward

# (string pair or None, context tokens, continuation tokens): what TemplateLM hands to scoring.
TokenRequest = tuple[Any, list[int], list[int]]
T = TypeVar("T")


def within_root_forward(root: nn.Module | None, run: Callable[[], T]) -> T:
    """`run()`, called from inside `root`'s forward when `root` is a `fully_shard`ed module (ZeRO-3 / FSDP2).

    FSDP2 gathers the parameters that a sharded module holds itself (those outside its sharded
    sub-modules: a LightningModule's embedding, final norm and LM head under ZeROStrategy) only in
    the hooks around that module's forward. Lightning's steps reach the model through the root's
    forward (its "forward redirection"); an evaluation of the model inside must go the same way.
    Any other `root` (None, a plain or DDP-wrapped module) just calls `run()`.
    """
    if not isinstance(root, FSDPModule):
        return run()
    shadowed = root.__dict__.get("forward")  # Lightning's redirection may leave one behind

    def forward(*args: Any, **kwargs: Any) -> T:
        restore_forward(root, shadowed)  # `run` may call the real forward
        return run()

    root.forward = forward
    try:
        with torch.no_grad():
            return root()
    finally:
        restore_forward(root, shadowed)


class LightningLM(TemplateLM):
    """lm-eval's model interface over `model` and `tokenizer` as they are in memory.

    Args:
        model: a causal LM (any `PreTrainedModel`, possibly wrapped by peft or sharded).
        tokenizer: its tokenizer; needs an eos token (the end-of-text marker and padding).
        batch_size: requests per forward pass / per `generate` call.
        max_length: context window; by default the model config's `max_position_embeddings`.
        max_gen_toks: default cap on generated tokens when a task does not set one.
        forward_context: context manager factory entered around every model call (e.g. autocast
            from the trainer's precision plugin).
        progress: show tqdm progress bars (on rank 0 only).
        group: the process group whose ranks split the requests (each evaluates its share); None: all
            ranks. Ranks outside it (other tensor-parallel slices of the same model) see the same requests
            as the rank of the group that shares their data-parallel coordinate.
        calls: how the strategy lets the model be called (KV cache in generation, lockstep over the ranks):
            what `lightning_llm.protocols.whole_model_evaluation` yields, inside which the model must then be
            evaluated. Default: a KV cache, lockstep only where the parameters are sharded (DTensors).

    With sharded parameters (ZeRO-3 / FSDP2) call lm-eval from `within_root_forward(root, ...)`,
    where `root` is the sharded module that contains `model` (the LightningModule); the benchmark
    callbacks do.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
        progress: bool = True,
        group: dist.ProcessGroup | None = None,
        calls: EvaluationCalls | None = None,
    ) -> None:
        super().__init__()
        if tokenizer is None or getattr(tokenizer, "eos_token_id", None) is None:
            raise ValueError(f"LightningLM needs a tokenizer with an eos token, got {tokenizer!r}")
        for name, value in (("batch_size", batch_size), ("max_gen_toks", max_gen_toks), ("max_length", max_length)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._max_length = max_length or resolve_max_length(model.config, tokenizer)
        self._max_gen_toks = max_gen_toks
        self._forward_context = forward_context or contextlib.nullcontext
        self._device = next(model.parameters()).device
        self._group = group
        distributed = dist.is_available() and dist.is_initialized()
        self._progress = progress and (not distributed or dist.get_rank() == 0)
        if distributed:
            self._rank, self._world_size = dist.get_rank(group), dist.get_world_size(group)
        # Every forward pass of a model with DTensor parameters is a collective over all ranks (ZeRO's
        # all-gathers over the data-parallel ranks, tensor parallelism's over its group).
        self._sharded = distributed and dist.get_world_size() > 1 and any(
            type(p).__name__ == "DTensor" for p in model.parameters()
        )
        calls = calls or EvaluationCalls()
        self._lockstep = self._sharded or (distributed and dist.get_world_size() > 1 and calls.lockstep)
        self._kv_cache = calls.kv_cache
        self._scores_kept_positions = "logits_to_keep" in inspect.signature(model.forward).parameters

    # ---- what lm-eval asks of a model ----

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # As HFLM: BOS if the tokenizer has one, else end-of-text, stands for an empty context.
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # The tokenizer's own default for special tokens, unless the text already starts with BOS.
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            options["add_special_tokens"] = False
        return self.tokenizer.encode(string, **options)

    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        ordered = Collator(
            requests,
            sort_fn=lambda req: (-len(req[1] + req[2]), tuple(req[1] + req[2])),
            group_by="contexts",
            group_fn=lambda req: req[-2] + req[-1][:-1],
        )
        results: list[tuple[float, bool]] = []
        batches = list(ordered.get_batched(n=self.batch_size))
        throwaways = self._missing_calls(len(batches))
        with self._evaluating(), self._progress_bar(len(requests), "loglikelihood", disable_tqdm) as bar:
            for chunk in batches:
                for request, logprobs in zip(chunk, self._continuation_logprobs(chunk)):
                    greedy = logprobs.argmax(dim=-1)
                    for key, cont_toks, lp in ordered.get_cache(
                        req_str=request[0], cxt_toks=request[1], cont_toks=request[2], logits=logprobs.unsqueeze(0)
                    ):
                        # One computed row may serve several requests (one-token answers): each
                        # reads the trailing positions that its own continuation needs.
                        target = torch.tensor(cont_toks, device=lp.device)
                        n = len(cont_toks)
                        score = lp[0, -n:].gather(-1, target.unsqueeze(-1)).sum().item()
                        answer = (score, bool((greedy[-n:] == target).all()))
                        results.append(answer)
                        if key is not None:
                            self.cache_hook.add_partial("loglikelihood", key, answer)
                        bar.update(1)
            for _ in range(throwaways):
                with self._forward_context():
                    self.model(self._dummy_input())
        return ordered.get_original(results)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        windows: list[TokenRequest] = []
        counts = []
        for (string,) in (req.args for req in requests):
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )
            doc_windows = [(None, *lm_utils.make_disjoint_window(w)) for w in rolling]
            windows += doc_windows
            counts.append(len(doc_windows))
        scores = iter(self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm))
        totals = []
        for req, count in zip(requests, counts):
            total = sum(next(scores)[0] for _ in range(count))
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        ordered = Collator(
            [req.args for req in requests],
            sort_fn=lambda req: (-len(self.tok_encode(req[0])), req[0]),
            group_by="gen_kwargs",
            group_fn=lambda req: req[1],
        )
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        results: list[str] = []
        batches = list(ordered.get_batched(n=self.batch_size))
        throwaways = self._missing_calls(len(batches))
        with self._evaluating(), self._progress_bar(len(requests), "generate_until", disable_tqdm) as bar:
            for chunk in batches:
                contexts, all_gen_kwargs = zip(*chunk)
                kwargs = normalize_gen_kwargs(all_gen_kwargs[0], self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                for text, context in zip(self._generate(list(contexts), until, kwargs), contexts):
                    results.append(text)
                    self.cache_hook.add_partial("generate_until", (context, all_gen_kwargs[0]), text)
                    bar.update(1)
            for _ in range(throwaways):
                # One token, then synced_gpus keeps it stepping for as long as another rank's call runs.
                dummy = self._dummy_input()
                with self._forward_context():
                    self.model.generate(input_ids=dummy, attention_mask=torch.ones_like(dummy), max_new_tokens=1,
                                        do_sample=False, pad_token_id=self.eot_token_id, use_cache=self._kv_cache,
                                        synced_gpus=True)
        return ordered.get_original(results)

    # ---- torch.distributed, for lm-eval's data-parallel evaluation ----

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor.reshape(-1)) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.reshape(-1), group=self._group)
        return torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Gather on the group's rank `dst` (lm-eval's ranks are the group's)."""
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, gathered, group=self._group, group_dst=dst)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self._group)

    # ---- scoring and generation ----

    def _continuation_logprobs(self, chunk: list[TokenRequest]) -> list[torch.Tensor]:
        """Log-probabilities over the vocabulary at the positions that predict each continuation."""
        # As HFLM: context + continuation minus its last token, left-truncated to the window,
        # right-padded without a mask (causal attention never looks at the padding on the right).
        inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
        width = max(map(len, inputs))
        batch = torch.zeros(len(inputs), width, dtype=torch.long, device=self._device)
        for row, ids in enumerate(inputs):
            batch[row, : len(ids)] = torch.tensor(ids, device=self._device)
        spans = [range(len(ids) - len(cont), len(ids)) for ids, (_, _, cont) in zip(inputs, chunk)]
        kept = sorted(set().union(*spans)) if self._scores_kept_positions else list(range(width))
        if self._sharded and self._scores_kept_positions:
            # Under sequence parallelism the final hidden states are a DTensor split along the sequence, which
            # takes no plain index tensor; it does take the slice that an int `logits_to_keep` makes, so the
            # head scores every position from the first one kept (generation keeps the last one the same way).
            kept = list(range(kept[0], width))
        with self._forward_context():
            if self._sharded and self._scores_kept_positions:
                logits = self.model(batch, logits_to_keep=len(kept)).logits
            elif self._scores_kept_positions:
                logits = self.model(batch, logits_to_keep=torch.tensor(kept, device=self._device)).logits
            else:
                logits = self.model(batch).logits
        column = {position: i for i, position in enumerate(kept)}
        return [
            torch.log_softmax(logits[row, [column[p] for p in span]].float(), dim=-1)
            for row, span in enumerate(spans)
        ]

    def _generate(self, contexts: list[str], until: list[str], kwargs: dict[str, Any]) -> list[str]:
        max_gen_toks = kwargs.pop("max_gen_toks")
        max_context = self.max_length - max_gen_toks
        if max_context < 1:
            raise ValueError(
                f"max_gen_toks={max_gen_toks} leaves no room for a context in the model's window of {self.max_length} tokens; "
                "ask for fewer with lm-eval's gen_kwargs (lightning-llm evaluate --gen_kwargs max_gen_toks=N)"
            )
        # As HFLM: left-padded contexts, truncated on the left, greedy when temperature is 0.
        encoded = [self.tok_encode(c)[-max_context:] for c in contexts]
        width = max(map(len, encoded))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long, device=self._device)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids):] = torch.tensor(ids, device=self._device)
            attention_mask[row, width - len(ids):] = 1
        kwargs.setdefault("temperature", 0.0)
        if kwargs["temperature"] == 0.0 and kwargs.get("do_sample") is None:
            kwargs["do_sample"] = False
        if not kwargs.get("do_sample") and kwargs["temperature"] == 0.0:
            kwargs.pop("temperature")
        with self._forward_context():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_gen_toks,
                stopping_criteria=stop_sequences_criteria(self.tokenizer, until, width, len(encoded)),
                pad_token_id=pad,
                use_cache=self._kv_cache,
                synced_gpus=self._lockstep,
                **kwargs,
            )
        return [
            postprocess_generated_text(self.tokenizer.decode(row[width:].tolist(), skip_special_tokens=True), until, None)
            for row in output
        ]

    def _missing_calls(self, calls: int) -> int:
        """How many throwaway model calls this rank adds to its own `calls` (forward passes or
        `generate` calls) so that every rank makes as many as the busiest one.

        With sharded parameters every forward pass is a collective (the all-gathers), so a rank that
        runs out of work must keep calling the model (as where the strategy asks for lockstep). The counts
        are agreed on before any call: an exchange after its own work would meet another rank's all-gathers and hang.
        """
        if not self._lockstep:
            return 0
        most = torch.tensor(calls, device=self._device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return int(most) - calls

    def _dummy_input(self) -> torch.Tensor:
        return torch.full((1, 1), self.eot_token_id, dtype=torch.long, device=self._device)

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def _progress_bar(self, total: int, what: str, disable: bool) -> tqdm:
        return tqdm(total=total, desc=f"Running {what} requests", disable=disable or not self._progress)
