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
from rlhflab.eval.heldout import BOOTSTRAP
from rlhflab.generation import generate
from rlhflab.models import context_length, token_logprobs
from rlhflab.text import additive_mask, pack, pad_right, supports_packing

BENCHMARKS = ("reading", "arithmetic", "continuation", "cipher", "webtext")
TASKS = BENCHMARKS[:4]
"""The benchmarks with a few-shot form (webtext is text to predict, not a task)."""


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


def solved(name: str, item: dict) -> str:
    """A task item with its answer, as a few-shot example: the corpus's own form where the
    world wrote it (`solved`), else the context and the answer."""
    if "solved" in item:
        return item["solved"]
    if name == "continuation":
        return item["context"] + item["endings"][item["label"]]
    return f"{item['context']} {item['answer']}"


def few_shot(bench: dict[str, list[dict]], k: int, tokenizer, n_pos: int | None, room: int = 16) -> dict:
    """The task benchmarks in Table 14's few-shot form: each item's context after up to `k`
    solved items of its benchmark (the ones that follow it, wrapping: never itself), one a
    line in one document, the oldest dropped first until the context and `room` new tokens
    fit `n_pos`. Webtext has no few-shot form and is left out."""
    out = {}
    for name in TASKS:
        items = bench.get(name) or []
        rows = []
        for i, item in enumerate(items):
            shots = [solved(name, items[(i + j) % len(items)]) for j in range(1, min(k, len(items) - 1) + 1)]
            context = "\n".join([*shots, item["context"]])
            while shots and n_pos is not None and len(_context_ids(tokenizer, context)) + room > n_pos:
                shots.pop(0)
                context = "\n".join([*shots, item["context"]])
            rows.append({**item, "context": context})
        if rows:
            out[name] = rows
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
def _choice_hits(model, tokenizer, items: list[dict], batch_items: int = 32) -> list[float]:
    """1.0 per item whose correct ending has the highest mean log-likelihood, else 0.0.

    `batch_items` items to a forward, each context once with its endings after it
    (text.pack: each ending sees its context and itself only, so its log-likelihood is the
    one it gets alone); a model whose attention takes no 4D mask scores an item at a time,
    one padded row per ending (`_choice_means_padded`)."""
    groups = [
        (
            _context_ids(tokenizer, item["context"]),
            [tokenizer(e, add_special_tokens=False)["input_ids"] for e in item["endings"]],
        )
        for item in items
    ]
    if supports_packing(model):
        means = []
        for i in range(0, len(groups), batch_items):
            means += _choice_means_packed(model, groups[i : i + batch_items], tokenizer.pad_token_id)
    else:
        means = [_choice_means_padded(model, ctx, ends, tokenizer.pad_token_id) for ctx, ends in groups]
    hits = []
    for item, (_, ends) in zip(items, groups, strict=True):
        scores = means[: len(ends)]
        means = means[len(ends) :]
        hits.append(float(max(range(len(ends)), key=scores.__getitem__) == item["label"]))
    return hits


def _choice_means_padded(model, ctx: list[int], ends: list[list[int]], pad_id: int) -> list[float]:
    """Mean log-likelihood of each ending after `ctx`: one right-padded row per ending."""
    ids, mask = pad_right([ctx + e for e in ends], pad_id)
    ids, mask = ids.to(model.device), mask.to(model.device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    lp = token_logprobs(logits, ids[:, 1:])  # (K, T-1)
    return [float(lp[k, len(ctx) - 1 : len(ctx) - 1 + len(e)].mean()) for k, e in enumerate(ends)]


def _choice_means_packed(model, groups: list[tuple[list[int], list[list[int]]]], pad_id: int) -> list[float]:
    """`_choice_means_padded` of every (context, endings) group, in one packed forward;
    the logits read only where an ending token is predicted."""
    p = pack(groups, pad_id).to(model.device)
    out = model(
        input_ids=p.input_ids, attention_mask=p.attention_mask(additive_mask(model)), position_ids=p.position_ids
    )
    # Ending n's token j is predicted at its prompt's last token (j = 0), else at token j − 1.
    rows, pred, target, owner = [], [], [], []
    for n, (r, s, e, c) in enumerate(zip(p.rows.tolist(), p.starts.tolist(), p.cols.tolist(), p.prompt_ends.tolist())):
        rows += [r] * (e - s + 1)
        pred += [c, *range(s, e)]
        target += range(s, e + 1)
        owner += [n] * (e - s + 1)
    rows, pred, target, owner = (torch.tensor(x, device=model.device) for x in (rows, pred, target, owner))
    lp = token_logprobs(out.logits[rows, pred], p.input_ids[rows, target]).float()  # (M,) one per ending token
    sums = torch.zeros(len(p.rows), device=lp.device).index_add_(0, owner, lp)
    return (sums / (p.cols - p.starts + 1).to(lp.device)).tolist()


@torch.no_grad()
def _token_hits(model, tokenizer, texts: list[str], batch_size: int = 32) -> list[tuple[int, int]]:
    """(tokens predicted, tokens scored) per text: of the tokens of [bos] text [eos] (bos
    excepted), those that are the argmax of the model's next-token distribution. The
    documents are laid out as in pretraining."""
    n_pos = context_length(model.config)  # None: no limit, nothing cut
    seqs = [(_context_ids(tokenizer, t) + [tokenizer.eos_token_id])[:n_pos] for t in texts]
    out = []
    for i in range(0, len(seqs), batch_size):
        ids, mask = pad_right(seqs[i : i + batch_size], tokenizer.pad_token_id)
        ids, mask = ids.to(model.device), mask.to(model.device)
        pred = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
        scored = mask[:, 1:].bool()
        hits = ((pred == ids[:, 1:]) & scored).sum(-1)
        out.extend(zip(hits.tolist(), scored.sum(-1).tolist()))
    return out


def _token_accuracy(model, tokenizer, texts: list[str], batch_size: int = 32) -> float:
    """Fraction of all scored tokens of `texts` that the model predicts (_token_hits)."""
    pairs = _token_hits(model, tokenizer, texts, batch_size)
    return sum(h for h, _ in pairs) / max(1, sum(n for _, n in pairs))


Items = dict[str, tuple[list[float], list[float]]]
"""Per benchmark, (score of each item, its weight): the benchmark's score is the weighted
mean. Weights are 1, except webtext's: the tokens a document scores (its score is over tokens)."""


@torch.no_grad()
def capability_items(model, tokenizer, bench: dict[str, list[dict]]) -> Items:
    """Every item's score on every benchmark given (the raw material of capability_scores and
    of the bootstrap intervals in tax_keys)."""
    was_training = model.training
    model.eval()
    out: Items = {}
    if bench.get("reading"):
        preds = _greedy(model, tokenizer, [x["context"] for x in bench["reading"]])
        out["reading"] = [_f1(p, x["answer"]) for p, x in zip(preds, bench["reading"])]
    for name in ("arithmetic", "cipher"):
        if bench.get(name):
            preds = _greedy(model, tokenizer, [x["context"] for x in bench[name]])
            out[name] = [float((p.split() or [""])[0] == x["answer"].lower()) for p, x in zip(preds, bench[name])]
    if bench.get("continuation"):
        out["continuation"] = _choice_hits(model, tokenizer, bench["continuation"])
    items = {k: (v, [1.0] * len(v)) for k, v in out.items()}
    if bench.get("webtext"):
        pairs = _token_hits(model, tokenizer, [x["text"] for x in bench["webtext"]])
        items["webtext"] = ([h / max(1, n) for h, n in pairs], [float(n) for _, n in pairs])
    model.train(was_training)
    return items


def _weighted_mean(scores: list[float], weights: list[float]) -> float:
    return sum(s * w for s, w in zip(scores, weights)) / max(1e-12, sum(weights))


def scores_of(items: Items) -> dict[str, float]:
    """Each benchmark's score and their unweighted `mean`, rounded to 4 places."""
    out = {k: _weighted_mean(*v) for k, v in items.items()}
    out["mean"] = sum(out.values()) / max(1, len(out))
    return {k: round(v, 4) for k, v in out.items()}


def capability_scores(model, tokenizer, bench: dict[str, list[dict]]) -> dict[str, float]:
    """Each benchmark's score (reading F1, exact match, choice accuracy, webtext token
    accuracy) and their `mean`."""
    return scores_of(capability_items(model, tokenizer, bench))


TAX_REFERENCE = {"SFT": "GPT", "RL": "GPT", "PPO": "SFT"}
"""Whose capability a model's is measured against (tax_delta keys), by the first word of its
family: SFT and the RL init (RL-init, App. C.3's model) against the base model of their size;
PPO, PPO-ptx and the β sweep's PPO-beta<β> against SFT of their size, as Table 14 reads."""


def tax_references(names: list[str]) -> dict[str, str]:
    """'PPO-ptx-small' -> 'SFT-small' and so on (TAX_REFERENCE), for names of
    '<family>-<size>' whose reference is among `names`."""
    out = {}
    for name in names:
        family, _, size = name.rpartition("-")
        ref = f"{TAX_REFERENCE.get(family.split('-')[0])}-{size}"
        if family and ref in names:
            out[name] = ref
    return out


def tax_keys(
    items: dict[str, Items], reference: dict[str, str], seed: int, n: int = BOOTSTRAP, prefix: str = "tax"
) -> dict:
    """The alignment tax with 95% percentile bootstrap intervals (Table 14's per-benchmark
    form): `<prefix>/<m>/<bench>` (+ `_ci_low`, `_ci_high`) for every model, bench one of the
    benchmarks or `mean`; and `<prefix>_delta/<m>/<bench>` (+ CI), <m>'s score minus that of
    `reference[m]`, a paired bootstrap. Every model is resampled with the same draws of items
    (they all answered the same items), so a difference's interval leaves out the items'
    common difficulty."""
    benches = sorted({b for per in items.values() for b in per})
    rng = torch.Generator().manual_seed(seed)
    draws = {}
    for b in benches:
        size = max(len(per[b][0]) for per in items.values() if b in per)
        draws[b] = torch.randint(0, size, (n, size), generator=rng)

    def replicates(per: Items) -> dict[str, torch.Tensor]:
        out = {}
        for b in benches:
            if b not in per:
                continue
            s, w = torch.tensor(per[b][0], dtype=torch.float64), torch.tensor(per[b][1], dtype=torch.float64)
            idx = draws[b]
            out[b] = (s[idx] * w[idx]).sum(-1) / w[idx].sum(-1).clamp_min(1e-12)
        out["mean"] = torch.stack(list(out.values())).mean(0)
        return out

    def interval(x: torch.Tensor) -> tuple[float, float]:
        x = x.sort().values
        return float(x[int(0.025 * n)]), float(x[min(n - 1, int(0.975 * n))])

    reps = {m: replicates(per) for m, per in items.items()}
    out = {}
    for m, per in items.items():
        point = scores_of(per)
        for b, r in reps[m].items():
            lo, hi = interval(r)
            out.update({f"{prefix}/{m}/{b}": point[b], f"{prefix}/{m}/{b}_ci_low": lo, f"{prefix}/{m}/{b}_ci_high": hi})
        ref = reference.get(m)
        if ref not in items:
            continue
        ref_point = scores_of(items[ref])
        for b in reps[m].keys() & reps[ref].keys():
            lo, hi = interval(reps[m][b] - reps[ref][b])
            d = f"{prefix}_delta/{m}/{b}"
            out.update({d: point[b] - ref_point[b], f"{d}_ci_low": lo, f"{d}_ci_high": hi})
    return out
