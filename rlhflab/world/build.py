"""`rlhflab world`: write the lab world's splits, corpus, benchmarks and summary.

Output (JSONL in the docs/design.md §3 formats; extra keys such as `family` are ignored by
the readers):
  sft_train / sft_val                 {"prompt", "completion"}         demonstrations
  rm_train / rm_val / rm_heldout      {"prompt", "responses", "ranking", "labeler"}
  ppo_train / ppo_val / test          {"prompt"}
  truthful, truthful_instruction_qa   {"prompt", "question", "entity", "truth", "myth", ...}  held-out
  toxicity, toxicity_respectful, toxicity_biased   {"prompt", "text", "variant", ...}  (world/heldout.py)
  bias                                {"prompt", "other", "kind", "groups"}  sentence pairs
  corpus_train / corpus_val           {"text"}                         the web corpus
  benchmarks/{reading,arithmetic,continuation,cipher,webtext}.jsonl
  tokenizer/                          BPE trained on the corpus (transformers format)
  world.json, labelers.json, summary.json
Same seed, same bytes.
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from rlhflab.data import pair_agreement
from rlhflab.io import atomic_dir, write_json, write_jsonl
from rlhflab.text import train_tokenizer
from rlhflab.world import SCALES, VERSION, World
from rlhflab.world.corpus import benchmarks, web_document
from rlhflab.world.gold import STYLES, write
from rlhflab.world.tasks import FAMILIES

HELDOUT_SPLITS = (
    "truthful",
    "truthful_instruction_qa",
    "toxicity",
    "toxicity_respectful",
    "toxicity_biased",
    "bias",
)


def heldout_row(task) -> dict:
    """A held-out item as written: the prompt (bias: the first sentence, `other` the second) and its meta."""
    return {"prompt": task.prompt, "family": task.family, **task.meta}


def rank_rows(world: World, split: str, pool, rng: random.Random) -> list[dict]:
    rows = []
    for task in world.splits[split]:
        k = rng.randint(4, 9)  # §3.4: labelers rank K = 4 to 9 responses
        texts = world.candidates(task, k, rng)
        while len(set(texts)) < 2:  # K identical answers give no comparison
            texts = world.candidates(task, k, rng)
        labeler = rng.choice(pool)
        judg = [world.judge(task.prompt, t) for t in texts]
        rows.append(
            {
                "prompt": task.prompt,
                "responses": texts,
                "family": task.family,
                "ranking": labeler.rank(texts, judg, random.Random(rng.random())),
                "labeler": labeler.id,
            }
        )
    return rows


def measure_agreement(world: World, pool_a, pool_b, n: int, seed: str) -> float:
    """Fraction of response pairs two different labelers order the same way."""
    rng = random.Random(seed)
    agree = total = 0
    for task in world.splits["rm"][:n]:
        texts = world.candidates(task, rng.randint(4, 9), rng)
        judg = [world.judge(task.prompt, t) for t in texts]
        a = rng.choice(pool_a)
        b = rng.choice([x for x in pool_b if x.id != a.id])
        r1 = a.rank(texts, judg, random.Random(rng.random()))
        r2 = b.rank(texts, judg, random.Random(rng.random()))
        ag, tot = pair_agreement(r1, r2)
        agree, total = agree + ag, total + tot
    return agree / max(1, total)


def gold_sanity(world: World) -> dict:
    """Mean gold quality of demonstrations and of each bad style on held-out prompts."""
    rng = random.Random(f"sanity-{world.seed}")
    out: dict[str, list[float]] = {"demonstration": []}
    for task in world.splits["test"]:
        fam = FAMILIES[task.family]
        out["demonstration"].append(world.judge(task.prompt, fam.demo(task, rng)).quality)
        for style in STYLES:
            if style != "Helpful":
                out.setdefault(style, []).append(world.judge(task.prompt, write(task, style, world.facts, rng)).quality)
        if task.family == "harmful":
            out.setdefault("complies_with_harmful", []).append(
                world.judge(task.prompt, fam.wrong(task, world.facts, rng)).quality
            )
        if task.family == "false_premise":
            out.setdefault("sycophantic_false_premise", []).append(
                world.judge(task.prompt, write(task, "Sycophantic", world.facts, rng)).quality
            )
    return {k: round(statistics.mean(v), 4) for k, v in out.items() if v}


def build(out: Path, seed: int, scale: str, vocab_size: int = 1024) -> dict:
    world = World(seed, scale)
    sizes = world.sizes
    with atomic_dir(out) as tmp:
        rng = random.Random(f"demos-{seed}")
        for split, name in [("sft", "sft_train"), ("sft_val", "sft_val")]:
            write_jsonl(
                tmp / f"{name}.jsonl",
                [
                    {"prompt": t.prompt, "completion": world.demo(t, rng), "family": t.family}
                    for t in world.splits[split]
                ],
            )
        rng = random.Random(f"rankings-{seed}")
        counts = {}
        for split, name, pool in [
            ("rm", "rm_train", world.labelers),
            ("rm_val", "rm_val", world.labelers),
            ("rm_heldout", "rm_heldout", world.heldout_labelers),
        ]:
            counts[name] = write_jsonl(tmp / f"{name}.jsonl", rank_rows(world, split, pool, rng))
        for split, name in [
            ("ppo", "ppo_train"),
            ("ppo_val", "ppo_val"),
            ("test", "test"),
        ]:
            counts[name] = write_jsonl(
                tmp / f"{name}.jsonl", [{"prompt": t.prompt, "family": t.family} for t in world.splits[split]]
            )
        for split in HELDOUT_SPLITS:  # the held-out evaluation sets, with what grades them
            counts[split] = write_jsonl(tmp / f"{split}.jsonl", [heldout_row(t) for t in world.splits[split]])
        rng = random.Random(f"corpus-{seed}")
        corpus = [web_document(world.facts, rng) for _ in range(sizes["corpus"])]
        write_jsonl(tmp / "corpus_train.jsonl", [{"text": t} for t in corpus])
        # One tokenizer for every model of the world, trained on its web corpus.
        train_tokenizer(corpus, vocab_size).save_pretrained(str(tmp / "tokenizer"))
        write_jsonl(
            tmp / "corpus_val.jsonl",
            [{"text": web_document(world.facts, rng)} for _ in range(sizes["corpus_val"])],
        )
        for name, items in benchmarks(world.facts, seed, sizes["bench"]).items():
            write_jsonl(tmp / "benchmarks" / f"{name}.jsonl", items)
        write_json(tmp / "world.json", {"seed": seed, "scale": scale, "version": VERSION})
        write_json(
            tmp / "labelers.json",
            {
                "train": [asdict(x) for x in world.labelers],
                "heldout": [asdict(x) for x in world.heldout_labelers],
            },
        )
        summary = {
            "seed": seed,
            "scale": scale,
            "counts": {
                "sft_train": sizes["sft"],
                "sft_val": sizes["sft_val"],
                **counts,
                "corpus_train": sizes["corpus"],
                "corpus_val": sizes["corpus_val"],
                "benchmark_items_each": sizes["bench"],
            },
            "test_prompts": world.test_prompt_counts(),  # per family: test, distinct, unseen
            "families": {
                split: dict(sorted(Counter(t.family for t in tasks).items())) for split, tasks in world.splits.items()
            },
            "agreement/train_train": round(
                measure_agreement(world, world.labelers, world.labelers, sizes["agreement"], f"agree-tt-{seed}"),
                4,
            ),
            "agreement/train_heldout": round(
                measure_agreement(
                    world, world.labelers, world.heldout_labelers, sizes["agreement"], f"agree-th-{seed}"
                ),
                4,
            ),
            "gold_sanity": gold_sanity(world),
        }
        write_json(tmp / "summary.json", summary)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory (replaced atomically)")
    parser.add_argument("--seed", type=int, default=0, help="world seed (same seed, same bytes)")
    parser.add_argument(
        "--scale",
        choices=sorted(SCALES),
        default="lab",
        help="'lab' for the real pipeline, 'small' for tests",
    )
    parser.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary of the world's tokenizer")


def run_cli(args) -> int:
    summary = build(Path(args.out), args.seed, args.scale, args.vocab_size)
    c = summary["counts"]
    print(
        f"lab world (seed {args.seed}, {args.scale}) -> {args.out}: "
        f"{c['sft_train']} demonstrations, {c['rm_train']} rankings, {c['ppo_train']} PPO prompts, "
        f"{c['corpus_train']} web documents; labeler agreement "
        f"{summary['agreement/train_train']:.1%} (train-train), "
        f"{summary['agreement/train_heldout']:.1%} (train-heldout)"
    )
    return 0
