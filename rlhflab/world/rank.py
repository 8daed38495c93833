"""`rlhflab rank`: simulated labelers rank sampled responses (the lab world's labeling).

Reads `{"prompt", "responses"}` rows (what `rlhflab sample` writes), has one labeler
per row rank them (Plackett–Luce over gold + shared biases + personal taste), and
writes `{"prompt", "responses", "ranking", "labeler"}` rows that `rlhflab rm` reads.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from rlhflab.data import iter_jsonl
from rlhflab.errors import InputError
from rlhflab.io import write_jsonl
from rlhflab.world import World, load_world


def rank_samples(world: World, rows: list[dict], pool: str = "train", seed: int = 0) -> list[dict]:
    labelers = world.labelers if pool == "train" else world.heldout_labelers
    rng = random.Random(f"rank-{pool}-{seed}")
    out = []
    for row in rows:
        labeler = rng.choice(labelers)
        judgements = [world.judge(row["prompt"], r) for r in row["responses"]]
        if len(set(row["responses"])) < 2:
            continue  # all K samples identical: nothing to compare
        ranking = labeler.rank(row["responses"], judgements, random.Random(rng.random()))
        out.append(
            {
                "prompt": row["prompt"],
                "responses": row["responses"],
                "ranking": ranking,
                "labeler": labeler.id,
            }
        )
    return out


def read_samples(path: Path, world: World) -> list[dict]:
    rows = []
    for line, obj in iter_jsonl(path):
        prompt, responses = obj.get("prompt"), obj.get("responses")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("missing or not a string", file=str(path), line=line, field="prompt")
        if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
            raise InputError("must be a list of at least 2 strings", file=str(path), line=line, field="responses")
        try:
            world.task(prompt)
        except InputError:
            raise InputError("prompt is not from this lab world", file=str(path), line=line, field="prompt") from None
        rows.append({"prompt": prompt, "responses": responses})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world", required=True, help="lab world directory")
    parser.add_argument("--samples", required=True, help='JSONL of {"prompt", "responses"} rows')
    parser.add_argument("--out", required=True, help="rankings JSONL to write")
    parser.add_argument("--pool", choices=["train", "heldout"], default="train", help="which labelers rank")
    parser.add_argument("--seed", type=int, default=0)


def run_cli(args) -> int:
    world = load_world(args.world)
    rows = rank_samples(world, read_samples(Path(args.samples), world), args.pool, args.seed)
    n = write_jsonl(Path(args.out), rows)
    print(f"{n} rankings by {args.pool} labelers -> {args.out}")
    return 0
