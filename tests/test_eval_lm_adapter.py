"""LightningLM against lm-eval's own HFLM on the same (exported) weights and the same local data."""

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from eval_support import FIXTURES, loglikelihood_tolerance, one_thread, small_tokenizer, tiny_model
from lightning_llm.eval import tasks
from lightning_llm.eval.lm_adapter import LightningLM

pytestmark = pytest.mark.usefixtures("one_thread")

GEN = {"max_gen_toks": 24}


def fixture_tasks():
    return [
        tasks.benchmark_task("arc_challenge", FIXTURES / "ai2_arc"),
        tasks.mmlu_group(tasks.mmlu_configs(FIXTURES / "mmlu", ["abstract_algebra", "high_school_geography"], 1)),
        tasks.benchmark_task("gsm8k", FIXTURES / "gsm8k", num_fewshot=1),
        tasks.humaneval_task(max_gen_toks=24),
    ]


def evaluate(lm):
    return simple_evaluate(lm, tasks=fixture_tasks(), num_fewshot=1, limit=4, bootstrap_iters=0, gen_kwargs=GEN,
                           task_manager=tasks.task_manager(tasks.BENCHMARK_FOLDERS), confirm_run_unsafe_code=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = small_tokenizer()
    model = tiny_model(tokenizer)
    exported = tmp_path_factory.mktemp("exported")
    model.save_pretrained(exported)
    tokenizer.save_pretrained(exported)
    hflm = HFLM(pretrained=str(exported), device="cpu", batch_size=4, dtype="float32")
    return model, tokenizer, hflm


@pytest.fixture(scope="module")
def both_results(setup):
    model, tokenizer, hflm = setup
    return evaluate(LightningLM(model, tokenizer, batch_size=4, progress=False)), evaluate(hflm)


def test_metrics_equal_hflm(both_results):
    ours, theirs = both_results
    assert set(ours["results"]) == set(theirs["results"]) >= {"arc_challenge", "mmlu", "gsm8k", "humaneval"}
    for task, values in theirs["results"].items():
        for key, value in values.items():
            if "," in key:
                assert ours["results"][task][key] == pytest.approx(value), (task, key)
    assert ours["results"]["humaneval"]["pass@1,sandbox"] == theirs["results"]["humaneval"]["pass@1,sandbox"]


def continuation_length(lm, context, continuation):
    """Tokens scored for a (context, continuation) request, split as lm-eval splits them."""
    return len(lm._encode_pair(context, continuation)[1] if context else lm.tok_encode(continuation))


def test_per_sample_outputs_equal_hflm(setup, both_results):
    model, _, hflm = setup
    ours, theirs = both_results
    compared = 0
    for task, samples in theirs["samples"].items():
        assert len(ours["samples"][task]) == len(samples) > 0
        for mine, reference in zip(ours["samples"][task], samples):
            assert mine["arguments"] == reference["arguments"]
            for (mine_resp,), (ref_resp,), arguments in zip(mine["resps"], reference["resps"], reference["arguments"]):
                if isinstance(ref_resp, tuple):  # (log-likelihood, is_greedy)
                    tolerance = loglikelihood_tolerance(model, continuation_length(hflm, *arguments), ref_resp[0])
                    assert mine_resp[0] == pytest.approx(ref_resp[0], rel=0, abs=tolerance)
                    assert mine_resp[1] == ref_resp[1]
                else:  # generated text
                    assert mine_resp == ref_resp
                compared += 1
    assert compared > 50


def test_rolling_loglikelihood_and_empty_context_equal_hflm(setup):
    model, tokenizer, _ = setup
    texts = ["def add(a, b):\n    return a + b\n" * 6, "x = 1", "The quick brown fox jumps over the lazy dog. " * 4]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    pairs = [("", "import os"), ("Question: 2 + 2 =", " 4"), ("x = ", "[1, 2, 3]"), ("def f(x):", "\n    return x")]
    loglik = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    # A short window makes the long texts span several rolling windows.
    ours = LightningLM(model, tokenizer, batch_size=3, max_length=32, progress=False)
    theirs = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=3, max_length=32)
    for text, a, b in zip(texts, ours.loglikelihood_rolling(rolling), theirs.loglikelihood_rolling(rolling)):
        assert a == pytest.approx(b, rel=0, abs=loglikelihood_tolerance(model, len(tokenizer.encode(text)), b))
    for (context, continuation), (a, ga), (b, gb) in zip(pairs, ours.loglikelihood(loglik), theirs.loglikelihood(loglik)):
        tolerance = loglikelihood_tolerance(model, continuation_length(theirs, context, continuation), b)
        assert a == pytest.approx(b, rel=0, abs=tolerance) and ga == gb


def test_results_do_not_depend_on_batch_size(setup):
    model, tokenizer, _ = setup
    pairs = [("Question: what is 3 + 4?\nAnswer:", c) for c in (" 7", " 12", " seven", " 34")] + [("a" * 40, " b")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    one = LightningLM(model, tokenizer, batch_size=1, progress=False).loglikelihood(requests)
    many = LightningLM(model, tokenizer, batch_size=5, progress=False).loglikelihood(requests)
    for (a, ga), (b, gb) in zip(one, many):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def naive_greedy(model, tokenizer, context: str, steps: int) -> str:
    ids = tokenizer.encode(context)
    new = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_generation_is_bounded_greedy_and_training_mode_restored(setup):
    model, tokenizer, _ = setup
    model.train()
    lm = LightningLM(model, tokenizer, batch_size=2, progress=False)
    never = {"until": ["\u2603 never produced \u2603"], "max_gen_toks": 7, "do_sample": False}
    contexts = ["def f(x):", "x", "Question: how many legs does a spider have?"]
    out = lm.generate_until([Instance("generate_until", {}, (c, never), i) for i, c in enumerate(contexts)])
    model.eval()
    assert out == [naive_greedy(model, tokenizer, c, 7) for c in contexts]
    model.train()
    lm.generate_until([Instance("generate_until", {}, ("x", never), 0)])
    assert model.training, "the model must return to training mode"
    assert all(p.grad is None for p in model.parameters())
    model.eval()


def test_rejects_bad_arguments(setup):
    model, tokenizer, _ = setup
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        LightningLM(model, tokenizer, batch_size=0)
    no_eos = small_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="needs a tokenizer with an eos token"):
        LightningLM(model, no_eos)
