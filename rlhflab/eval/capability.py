"""Capability benchmarks (the alignment tax): scored the way the paper scores GPT-3.

Items are in the web corpus's natural form, with no instruction template: reading
(SQuAD-like, F1 of a greedy answer), arithmetic (DROP-like, exact match), continuation
(HellaSwag-like, choice by mean log-likelihood) and cipher (translation-like, exact).
webtext is the pretraining distribution itself (LAMBADA-like, but every token): the
fraction of tokens of held-out web documents the model predicts greedily. It does not
saturate where the four task benchmarks do: after SFT the small lab models sit at the floor
on those, so what PPO then trades away shows only here.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from rlhflab.data import iter_jsonl
from rlhflab.errors import InputError
from rlhflab.generation import generate
from rlhflab.models import context_length, token_logprobs
from rlhflab.text import pad_right

BENCHMARKS = ("reading", "arithmetic", "continuation", "cipher", "webtext")


def load_benchmarks(world_dir: str | Path, limit: int | None = None) -> dict[str, list[dict]]:
    out = {}
    for name in BENCHMARKS:
        path = Path(world_dir) / "benchmarks" / f"{name}.jsonl"
        if not path.is_file():
            raise InputError(
                f"no {name} benchmark: the world was written by an older rlhflab; write it again with `rlhflab world`",
                file=str(path),
            )
        rows = [obj for _, obj in iter_jsonl(path)]
        out[name] = rows[:limit] if limit else rows
    return out


def _context_ids(tokenizer, text: str) -> list[int]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(text, add_special_tokens=False)["input_ids"]


def _greedy(model, tokenizer, contexts: list[str], n_tokens: int = 6) -> list[str]:
    """The first line or sentence of a greedy continuation, lower-cased (one batch)."""
    out = generate(
        model,
        tokenizer,
        [_context_ids(tokenizer, c) for c in contexts],
        max_new_tokens=n_tokens,
        temperature=0,
        batch_size=max(1, len(contexts)),
    )
    # Not out.texts: those are stripped first, and a continuation opening with a newline
    # must read as empty here.
    texts = [
        tokenizer.decode([t for t in r if t != tokenizer.pad_token_id], skip_special_tokens=True) for r in out.tokens
    ]
    return [re.split(r"[.\n]", t)[0].strip().lower() for t in texts]


def _f1(pred: str, gold: str) -> float:
    p, g = pred.split(), gold.lower().split()
    common = sum(min(p.count(w), g.count(w)) for w in set(g))
    return 0.0 if not common else 2 * common / (len(p) + len(g))


@torch.no_grad()
def _choice_accuracy(model, tokenizer, items: list[dict]) -> float:
    correct = 0
    for item in items:
        ctx = _context_ids(tokenizer, item["context"])
        ends = [tokenizer(e, add_special_tokens=False)["input_ids"] for e in item["endings"]]
        ids, mask = pad_right([ctx + e for e in ends], tokenizer.pad_token_id)
        ids, mask = ids.to(model.device), mask.to(model.device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        lp = token_logprobs(logits, ids[:, 1:])  # (K, T-1)
        scores = [float(lp[k, len(ctx) - 1 : len(ctx) - 1 + len(e)].mean()) for k, e in enumerate(ends)]
        correct += int(max(range(len(ends)), key=scores.__getitem__) == item["label"])
    return correct / max(1, len(items))


@torch.no_grad()
def _token_accuracy(model, tokenizer, texts: list[str], batch_size: int = 32) -> float:
    """Fraction of the tokens of [bos] text [eos] (bos excepted) that are the argmax of the
    model's next-token distribution: the documents are laid out as in pretraining."""
    n_pos = context_length(model.config)  # None: no limit, nothing cut
    seqs = [(_context_ids(tokenizer, t) + [tokenizer.eos_token_id])[:n_pos] for t in texts]
    hits = total = 0
    for i in range(0, len(seqs), batch_size):
        ids, mask = pad_right(seqs[i : i + batch_size], tokenizer.pad_token_id)
        ids, mask = ids.to(model.device), mask.to(model.device)
        pred = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
        scored = mask[:, 1:].bool()
        hits += int((pred == ids[:, 1:])[scored].sum())
        total += int(scored.sum())
    return hits / max(1, total)


@torch.no_grad()
def capability_scores(model, tokenizer, bench: dict[str, list[dict]]) -> dict[str, float]:
    was_training = model.training
    model.eval()
    out = {}
    if bench.get("reading"):
        preds = _greedy(model, tokenizer, [x["context"] for x in bench["reading"]])
        out["reading"] = sum(_f1(p, x["answer"]) for p, x in zip(preds, bench["reading"])) / len(preds)
    for name in ("arithmetic", "cipher"):
        if bench.get(name):
            preds = _greedy(model, tokenizer, [x["context"] for x in bench[name]])
            out[name] = sum((p.split() or [""])[0] == x["answer"].lower() for p, x in zip(preds, bench[name])) / len(
                preds
            )
    if bench.get("continuation"):
        out["continuation"] = _choice_accuracy(model, tokenizer, bench["continuation"])
    if bench.get("webtext"):
        out["webtext"] = _token_accuracy(model, tokenizer, [x["text"] for x in bench["webtext"]])
    out["mean"] = sum(out.values()) / max(1, len(out))
    model.train(was_training)
    return {k: round(v, 4) for k, v in out.items()}
