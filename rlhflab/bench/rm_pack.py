"""`rlhflab bench --rm`: the reward model's training step on padded rows (one row per
response, how a K-wise batch is usually fed) against packed rows (RMConfig.pack:
each prompt once, its responses after it under a 4D mask, text.pack).

The model has the lab's large shape (GPT-2, 4 layers, d 192, 6 heads, vocab 1024; random
init, from config); the rankings have the lab's shape: per prompt a query of 8..24
tokens and K = 4..9 responses of 2..48 tokens (mean ~13, as the lab's comparisons), 8
prompts per step. The two sides alternate step by step on the same batches in one
process, so a machine's drift hits both; figures are medians over the measured steps and
the ratio is the median of the per-step ratios. Both sides score the first batch before
training and the largest difference is printed: the speed is not bought by computing
something else.
"""

from __future__ import annotations

import random
import statistics
import time

WARMUP = 3
"""Steps per side left out of the figures."""
LAB_LARGE = dict(n_layer=4, n_embd=192, n_head=6, vocab_size=1024, n_positions=256)
"""The lab's large model (models.LAB_SIZES), dropout off as the lab trains it."""
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def rankings(n_prompts: int, seed: int = 0):
    """`n_prompts` random lab-shaped `rm.Comparison`s (token ids 4.., pad 0) with every
    pair of a full ranking."""
    from rlhflab.stages.rm import Comparison

    rng = random.Random(seed)
    vocab = LAB_LARGE["vocab_size"]
    out = []
    for _ in range(n_prompts):
        query = [rng.randrange(4, vocab) for _ in range(rng.randint(8, 24))]
        k = rng.randint(4, 9)
        lengths = [min(48, 2 + int(rng.expovariate(1 / 11))) for _ in range(k)]
        seqs = [query + [rng.randrange(4, vocab) for _ in range(n)] for n in lengths]
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        out.append(Comparison(seqs, pairs, [len(query)] * k))
    return out


def bench_rm(steps: int = 30, precision: str = "auto", threads: int | None = 2, log=print) -> dict:
    """Time `steps` RM training steps per side (after WARMUP more); the report."""
    import dataclasses

    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from rlhflab import distributed
    from rlhflab.bench.common import cpu_name
    from rlhflab.device import autocast, choose_precision, fast_kernels
    from rlhflab.errors import InputError
    from rlhflab.models import reward_scores
    from rlhflab.stages.rm import RMConfig, _loss, collate
    from rlhflab.text import additive_mask
    from rlhflab.training import adam

    if steps < 2:
        raise InputError("needs at least 2 steps", field="steps")
    device = torch.device("cpu")
    reason = "asked for"
    if precision == "auto":
        choice = choose_precision(device)
        precision, reason = choice.precision, choice.reason
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(num_labels=1, pad_token_id=0, **LAB_LARGE, **NO_DROPOUT))
    fast_kernels(model.train(), device, precision)
    config = RMConfig(base="-", rankings="-")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, precision=precision))
    data = rankings(8 * (steps + WARMUP))
    batches = [data[i : i + 8] for i in range(0, len(data), 8)]
    sides = {"padded": None, "packed": (config.pack_width, additive_mask(model))}

    model.eval()  # the same scores on both sides, before any step
    with torch.no_grad(), autocast(device, precision):
        first = {
            name: collate(batches[0], 0, *(p or (None, True))).scores(lambda *a: reward_scores(model, *a))
            for name, p in sides.items()
        }
    max_diff = float((first["packed"] - first["padded"]).abs().max())
    model.train()

    scorer = distributed.Forward(model, reward_scores)
    opt = adam(model.parameters(), lr=1e-4)
    times: dict[str, list[float]] = {name: [] for name in sides}
    log(f"bench: RM steps on lab-shaped rankings, padded vs packed, {precision}, {torch.get_num_threads()} threads ...")
    for b, batch in enumerate(batches):
        for name, packing in sides.items():
            t = time.perf_counter()
            _loss(scorer, batch, 0, config, device, packing=packing)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if b >= WARMUP:
                times[name].append(time.perf_counter() - t)
    slots = {
        name: sum(collate(bt, 0, *(p or (None, True))).input_ids.numel() for bt in batches) / len(batches)
        for name, p in sides.items()
    }
    return {
        "workload": {
            "model": LAB_LARGE,
            "prompts_per_step": 8,
            "steps": steps,
            "precision": precision,
            "precision_reason": reason,
            "threads": torch.get_num_threads(),
            "pack_width": config.pack_width,
        },
        "cpu": cpu_name(),
        "ms_per_step": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "token_slots_per_step": slots,
        "packed_over_padded_time": statistics.median(
            a / b for a, b in zip(times["packed"], times["padded"], strict=True)
        ),
        "max_score_diff": max_diff,
    }


def format_rm_report(r: dict) -> str:
    w, ms, slots = r["workload"], r["ms_per_step"], r["token_slots_per_step"]
    return "\n".join(
        [
            f"rlhflab bench --rm: RM training step, lab-large shape, {w['prompts_per_step']} prompts (K = 4..9) per "
            f"step, {w['steps']} steps per side",
            f"  cpu {r['cpu']}, {w['threads']} threads, {w['precision']} ({w['precision_reason']})",
            f"  padded rows: {ms['padded']:8.1f} ms/step  {slots['padded']:7.0f} token slots",
            f"  packed rows: {ms['packed']:8.1f} ms/step  {slots['packed']:7.0f} token slots"
            f"  (pack_width {w['pack_width'] or '0: twice the longest'})",
            f"  packed / padded time: {r['packed_over_padded_time']:.3f} (median of per-step ratios)",
            f"  largest score difference on the first batch: {r['max_score_diff']:.2e}",
        ]
    )
