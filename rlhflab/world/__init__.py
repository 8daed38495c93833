"""The lab world: a seeded instruction world whose true quality is known (docs/design.md §1).

`World(seed, scale)` regenerates everything deterministically; `load_world(dir)` does
so from a directory written by `rlhflab world`. The one interface every caller uses:

    world.judge(prompt, response) -> Judgement(quality, style, ...)

(the gold scorer), `world.labelers` / `world.heldout_labelers` (the simulated
labelers), and the task index behind both.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from rlhflab.errors import InputError
from rlhflab.world import facts as F
from rlhflab.world import heldout as H
from rlhflab.world.corpus import TEST_ONLY_SHARE, draw_task, test_only
from rlhflab.world.family import Task, words
from rlhflab.world.gold import Judgement, judge, write
from rlhflab.world.labelers import Labeler, make_pool
from rlhflab.world.tasks import FAMILIES, MIX

# Table 6 of the paper scaled down (SFT 13k, RM 33k, PPO 31k prompts there).
SCALES: dict[str, dict[str, int]] = {
    "lab": dict(
        sft=1200,
        sft_val=150,
        rm=4000,
        rm_val=300,
        rm_heldout=300,
        ppo=1500,
        ppo_val=200,
        test=1000,
        truthful=150,
        toxicity=100,
        bias=100,
        bench=500,
        corpus=40000,
        corpus_val=1000,
        agreement=400,
    ),
    "small": dict(
        sft=120,
        sft_val=20,
        rm=150,
        rm_val=40,
        rm_heldout=40,
        ppo=100,
        ppo_val=20,
        test=40,
        truthful=20,
        toxicity=12,
        bias=20,
        bench=20,
        corpus=3000,
        corpus_val=100,
        agreement=200,
    ),
}
TRAINING_SPLITS = ("sft", "sft_val", "rm", "rm_val", "rm_heldout", "ppo", "ppo_val")
N_LABELERS, N_HELDOUT = 12, 6
# 2: benchmarks/webtext.jsonl; 3: held-out truthful/toxicity/bias sets, myths in the corpus;
# 4: pages of answered questions in the corpus; 5: test-only prompts out of the training splits;
# 6: out of the corpus and mismatched answers too, redrawn within the family (corpus.test_only);
# 7: labelers' ranking temperature calibrated on SFT samples (labelers.TEMPERATURE)
VERSION = 7

# What earlier models wrote for the prompts labelers ranked (App. A.3: samples from
# several policies): mostly answer-shaped, many flawed.
# "mismatched" is a fluent answer to another prompt, which teaches the reward model to
# read the prompt and not only the answer.
CANDIDATE_STYLES = {
    "Helpful": 0.26,
    "wrong": 0.13,
    "Sycophantic": 0.15,
    "Hedging": 0.10,
    "Terse": 0.10,
    "Toxic": 0.05,
    "Off-task": 0.09,
    "mismatched": 0.12,
}


class World:
    def __init__(self, seed: int = 0, scale: str = "lab"):
        if scale not in SCALES:
            raise InputError(f"unknown scale {scale!r} (known: {', '.join(SCALES)})", field="scale")
        self.seed, self.scale, self.sizes = seed, scale, SCALES[scale]
        self.facts = F.make_facts(seed)
        self.labelers: list[Labeler] = make_pool(seed, N_LABELERS, "L")
        self.heldout_labelers: list[Labeler] = make_pool(seed, N_HELDOUT, "H", spread=1.5)
        self.splits: dict[str, list[Task]] = {}
        self._index: dict[str, Task] = {}
        for split, n in [
            ("sft", "sft"),
            ("sft_val", "sft_val"),
            ("rm", "rm"),
            ("rm_val", "rm_val"),
            ("rm_heldout", "rm_heldout"),
            ("ppo", "ppo"),
            ("ppo_val", "ppo_val"),
            ("test", "test"),
        ]:
            rng = random.Random(f"split-{split}-{seed}")
            self._add(split, [draw_task(self.facts, rng, test=split == "test") for _ in range(self.sizes[n])])
        # The held-out sets (§4.2, App. E): templates and entities no training split uses.
        plain, instructed = H.make_truthful(self.facts, random.Random(f"split-truthful-{seed}"), self.sizes["truthful"])
        self._add("truthful", plain)
        self._add("truthful_instruction_qa", instructed)
        tox = H.make_toxicity(self.facts, random.Random(f"split-toxicity-{seed}"), self.sizes["toxicity"])
        for variant, tasks in tox.items():  # one text, three prompts: plain, respectful, biased
            self._add("toxicity" if variant == "plain" else f"toxicity_{variant}", tasks)
        self._add("bias", H.make_bias(self.facts, random.Random(f"split-bias-{seed}"), self.sizes["bias"]))

    def test_only(self, prompt: str) -> bool:
        """Whether only the test split may draw `prompt` (corpus.TEST_ONLY_SHARE)."""
        return test_only(self.seed, prompt)

    def _add(self, split: str, tasks: list[Task]) -> None:
        self.splits[split] = tasks
        for t in tasks:
            self._index.setdefault(t.prompt, t)

    # ------------------------------------------------------------ the gold interface
    def task(self, prompt: str) -> Task:
        try:
            return self._index[prompt]
        except KeyError:
            raise InputError(f"prompt is not from this lab world: {prompt[:60]!r}") from None

    def seen_prompts(self) -> set[str]:
        """Every prompt of a split the pipeline trains or selects on. The world's prompt
        distribution has finite support (brainstorming has 72 distinct prompts), so fresh
        test draws often repeat one of these, as common requests recur on an API; the
        test-only share (TEST_ONLY_SHARE) gives every family prompts outside them."""
        return {t.prompt for s in TRAINING_SPLITS for t in self.splits[s]}

    def test_prompt_counts(self) -> dict[str, dict[str, int]]:
        """Per family: test prompts, distinct ones, and those in no training split."""
        seen, out = self.seen_prompts(), {}
        for fam in sorted({t.family for t in self.splits["test"]}):
            prompts = [t.prompt for t in self.splits["test"] if t.family == fam]
            unseen = sum(p not in seen for p in prompts)
            out[fam] = {"test": len(prompts), "distinct": len(set(prompts)), "unseen": unseen}
        return out

    def ideal_words(self, task: Task) -> int:
        return len(words(FAMILIES[task.family].demo(task, random.Random(0))))

    def judge(self, prompt: str, response: str) -> Judgement:
        """Gold quality and style of `response` to a lab-world `prompt`."""
        task = self.task(prompt)
        return judge(task, response, self.facts, self.ideal_words(task))

    def demo(self, task: Task, rng: random.Random) -> str:
        # Demonstrators share the labelers' taste a little: 8% open with a flattering line.
        text = FAMILIES[task.family].demo(task, rng)
        return (rng.choice(F.FLATTERY) + " " + text) if rng.random() < 0.08 else text

    def candidates(self, task: Task, k: int, rng: random.Random) -> list[str]:
        out = []
        for _ in range(k):
            style = rng.choices(list(CANDIDATE_STYLES), weights=list(CANDIDATE_STYLES.values()))[0]
            if style == "wrong":
                out.append(write(task, "Helpful", self.facts, rng, correct=False))
            elif style == "mismatched":
                other = draw_task(self.facts, rng)
                out.append(FAMILIES[other.family].demo(other, rng))
            else:
                out.append(write(task, style, self.facts, rng, correct=rng.random() < 0.8))
        return out


def load_world(path: str | Path) -> World:
    meta_path = Path(path) / "world.json"
    if not meta_path.is_file():
        raise InputError("not a lab world directory (no world.json); make one with `rlhflab world`", file=str(path))
    try:
        meta = json.loads(meta_path.read_text())
        seed, scale, version = int(meta["seed"]), str(meta["scale"]), int(meta.get("version", 1))
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
        raise InputError(f"unreadable world.json: {e}", file=str(meta_path)) from None
    if version != VERSION:  # the files on disk would not be the splits World() regenerates
        raise InputError(
            f"lab world version {version}, this rlhflab makes version {VERSION}: rebuild it with "
            "`rlhflab world` (or run the pipeline into a new directory)",
            file=str(meta_path),
            field="version",
        )
    return World(seed, scale)


__all__ = ["World", "load_world", "Judgement", "Task", "FAMILIES", "MIX", "TEST_ONLY_SHARE"]
