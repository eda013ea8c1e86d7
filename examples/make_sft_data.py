"""Generate a small instruction set, or measure a model's exact-match on its held-out questions.

    python examples/make_sft_data.py --out data/sft                     # data/sft/{train,test}.jsonl
    python examples/make_sft_data.py --eval runs/sft_tiny/hf --data data/sft/test.jsonl

Three tasks with one right answer each, written as chat `messages` records: adding two numbers,
reversing a list of words, and naming the function a Python docstring belongs to (pairs taken from
the standard library on this machine). Questions are split between training and test by a hash of
the question, so no held-out question is ever trained on.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import sysconfig
from functools import partial
from pathlib import Path

WORDS = ("apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "robot", "ocean", "pencil", "garden", "window")
TASKS = ("add", "reverse", "docstring")
DEFAULT_TASKS = ("add", "reverse")


def add_question(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"What is {a} + {b}?", str(a + b)


def reverse_question(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(2, 4))
    return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))


def docstring_question(rng: random.Random, pairs: list[tuple[str, str]]) -> tuple[str, str]:
    doc, name = rng.choice(pairs)
    return f"Which function is documented as: {doc}", name


def stdlib_docstrings(limit: int = 2000) -> list[tuple[str, str]]:
    """(first docstring line, function name) pairs of public standard-library functions."""
    pairs = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in tree.body:
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            if doc and not node.name.startswith("_") and 10 <= len(doc.splitlines()[0]) <= 80:
                pairs.append((doc.splitlines()[0], node.name))
        if len(pairs) >= limit:
            break
    return pairs


def make_records(tasks: tuple[str, ...] = DEFAULT_TASKS, n: int = 3000, seed: int = 0) -> list[dict]:
    """`n` distinct questions, cycling over `tasks`, as chat records."""
    rng = random.Random(seed)
    makers = {"add": add_question, "reverse": reverse_question}
    if "docstring" in tasks:
        makers["docstring"] = partial(docstring_question, pairs=stdlib_docstrings())
    seen, records = set(), []
    for i in range(n * 20):  # questions repeat once a task runs out of new ones: stop short of n then
        if len(records) == n:
            break
        question, answer = makers[tasks[i % len(tasks)]](rng)
        if question not in seen:
            seen.add(question)
            records.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return records


def is_held_out(record: dict, test_fraction: float) -> bool:
    digest = hashlib.sha256(record["messages"][0]["content"].encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < test_fraction


def split_records(records: list[dict], test_fraction: float = 0.1) -> tuple[list[dict], list[dict]]:
    test = [r for r in records if is_held_out(r, test_fraction)]
    return [r for r in records if not is_held_out(r, test_fraction)], test


def exact_match(model, tokenizer, records: list[dict], max_new_tokens: int = 16) -> float:
    """Share of records whose greedy answer is exactly the reference answer."""
    from lightning_llm.modules.instruct import generate_answer

    hits = 0
    for record in records:
        *prompt, answer = record["messages"]
        hits += generate_answer(model, tokenizer, prompt, max_new_tokens).strip() == answer["content"]
    return hits / len(records)


def write_jsonl(records: list[dict], path: Path) -> None:
    """The records as JSON lines, written atomically: a killed run leaves the previous file whole."""
    from lightning_llm.checkpoint import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        f.write("".join(json.dumps(r) + "\n" for r in records).encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/sft", help="directory for train.jsonl and test.jsonl")
    parser.add_argument("--n", type=int, default=3000, help="number of distinct questions")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval", metavar="MODEL", help="a checkpoint or export: print its exact-match on --data")
    parser.add_argument("--data", default="data/sft/test.jsonl", help="held-out records for --eval")
    parser.add_argument("--show", type=int, default=5, help="with --eval, print this many answers")
    args = parser.parse_args()
    if args.eval:
        from lightning_llm.data.instruct import use_chat_template
        from lightning_llm.export import load_for_inference
        from lightning_llm.modules.instruct import fit_embeddings, generate_answer

        model, tokenizer = load_for_inference(args.eval)
        # An untuned model has no template yet: ask it the way tuning will (new role tokens, fresh embeddings).
        fit_embeddings(model, use_chat_template(tokenizer))
        records = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
        for record in records[: args.show]:
            print(f"{record['messages'][0]['content']!r} -> {generate_answer(model, tokenizer, record['messages'][:-1], 16)!r}")
        print(f"exact match: {exact_match(model, tokenizer, records):.1%} of {len(records)} held-out questions")
        return
    tasks = tuple(args.tasks.split(","))
    unknown = set(tasks) - set(TASKS)
    if unknown:
        parser.error(f"unknown task(s) {sorted(unknown)}; choose from {', '.join(TASKS)}")
    train, test = split_records(make_records(tasks, args.n, args.seed))
    write_jsonl(train, Path(args.out) / "train.jsonl")
    write_jsonl(test, Path(args.out) / "test.jsonl")
    print(f"wrote {len(train)} training and {len(test)} held-out records to {args.out}")


if __name__ == "__main__":
    main()
