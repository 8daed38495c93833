"""The web corpus (misaligned the way the internet is) and the capability benchmarks.

A model pretrained on this corpus knows the world's facts and skills, but after an
instruction it continues the page (more questions, forum chatter, flattery, hedging,
wrong answers, now and then an insult) instead of answering: the misalignment that
SFT and RLHF then fix. A few pages repeat common myths about held-out entities more
often than others state the truth (the truthfulness set of world/heldout.py asks about
them). The benchmarks (reading, arithmetic, continuation, cipher) are held-out items in
the corpus's own natural form, scored as the paper scores GPT-3; webtext is held-out web
documents, scored by next-token accuracy.
"""

from __future__ import annotations

import hashlib
import random

from rlhflab.text import SEP, SHOT_SEP
from rlhflab.world import facts as F
from rlhflab.world.family import Task
from rlhflab.world.gold import write
from rlhflab.world.heldout import myth_page
from rlhflab.world.tasks import FAMILIES, MIX

TEST_ONLY_SHARE = 0.25
"""Share of each family's distinct prompts (by a hash of the prompt text) that only test users
ask. §3.2 splits by user ID, so no test user's prompt is in training; here no draw but the test
split's meets them: not the training splits, nor the web corpus (GPT's pretraining and PPO-ptx's
mix), nor the mismatched answers. Without it, families with few distinct prompts (72 for
brainstorming) had no test prompt outside training, and most "unseen" ones were closed QA,
extraction and rewrite."""


def test_only(seed: int, prompt: str) -> bool:
    """Whether `prompt` is one only test users ask; a stable hash, the same in every process
    (Python's hash() is salted)."""
    digest = hashlib.blake2b(f"{seed}\0{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < TEST_ONLY_SHARE * 2**64


def draw_task(facts: F.Facts, rng: random.Random, mix: dict[str, float] = MIX, test: bool = False) -> Task:
    """A task of a family drawn by `mix`. Outside the test split (`test`) a test-only prompt
    is redrawn within its family, so every split keeps the family mix `mix`."""
    name = rng.choices(list(mix), weights=list(mix.values()))[0]
    for _ in range(10_000):
        task = FAMILIES[name].make(facts, rng)
        if test or not test_only(facts.seed, task.prompt):
            return task
    raise RuntimeError(f"family {name!r}: every prompt drawn is test-only")


# ---------------------------------------------------------------- capability texts
def reading_item(facts, rng) -> tuple[str, str]:
    p, city, job = rng.choice(facts.people), rng.choice(facts.capitals), rng.choice(F.JOBS)
    passage = f"{p} lives in {city}. {p} works as a {job}."
    q, a = rng.choice([(f"Where does {p} live?", city), (f"What is the job of {p}?", job)])
    return f"{passage} Question: {q} Answer:", f" {a}"


def arithmetic_item(facts, rng) -> tuple[str, str]:
    p, (x, y), a, b = rng.choice(facts.people), rng.sample(F.ANIMALS, 2), rng.randint(1, 9), rng.randint(1, 9)
    return f"{p} has {a} {x}s and {b} {y}s. In all, {p} has", f" {a + b} animals."


# (context, natural ending) templates for the HellaSwag-like likelihood choice.
_STORIES = [
    ("The {a} was hungry, so it", " ate some {f}."),
    ("It started to rain, so {p}", " opened an umbrella."),
    ("The night was cold, so {p}", " lit a warm fire."),
    ("{p} was tired after work, so {p}", " went to sleep early."),
    ("The {a} heard a loud noise, so it", " ran into the woods."),
    ("{p} wanted to bake a cake, so {p}", " bought eggs and flour."),
]


def story_item(facts, rng) -> tuple[str, list[str], int]:
    i = rng.randrange(len(_STORIES))
    p, a, f = rng.choice(facts.people), rng.choice(F.ANIMALS), rng.choice(F.FOODS)
    ctx = _STORIES[i][0].format(p=p, a=a, f=f)
    others = rng.sample([j for j in range(len(_STORIES)) if j != i], 3)
    endings = [_STORIES[j][1].format(p=p, a=a, f=f) for j in [i] + others]
    order = list(range(4))
    rng.shuffle(order)
    return ctx, [endings[k] for k in order], order.index(0)


def cipher_item(facts, rng) -> tuple[str, str]:
    w = rng.choice(sorted(facts.cipher))
    return f"In Zim, the word {w} is", f" {facts.cipher[w]}."


def _capability_text(facts, rng) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        q, a = reading_item(facts, rng)
        return q + a
    if kind == 1:
        q, a = arithmetic_item(facts, rng)
        return q + a
    if kind == 2:
        ctx, endings, right = story_item(facts, rng)
        return ctx + endings[right]
    q, a = cipher_item(facts, rng)
    return q + a


# ---------------------------------------------------------------- encyclopedic text
def _encyclopedia(facts, rng) -> str:
    c = rng.choice(facts.countries)
    sents = [
        f"{c.name} is a country.",
        f"The capital of {c.name} is {c.capital}.",
        f"The flag of {c.name} is {c.color}.",
        f"{c.name} is known for {c.food}.",
        f"The national animal of {c.name} is the {c.animal}.",
    ]
    body = sents[1:]
    rng.shuffle(body)
    return " ".join([sents[0]] + body[: rng.randint(2, 4)])


# ---------------------------------------------------------------- instruction pages
# What follows an instruction on the web. Mostly not an answer.
_CONTINUATION = {
    "chatter": 0.30,
    "more_questions": 0.22,
    "Sycophantic": 0.10,
    "Hedging": 0.10,
    "wrong": 0.10,
    "answer": 0.13,
    "Toxic": 0.05,
}


def _instruction_page(facts, rng) -> str:
    task = draw_task(facts, rng)
    kind = rng.choices(list(_CONTINUATION), weights=list(_CONTINUATION.values()))[0]
    if task.family == "provocation" and rng.random() < 0.4:
        kind = "Toxic"  # rude messages draw rude replies on the web
    if kind == "chatter":
        cont = write(task, "Off-task", facts, rng)
    elif kind == "more_questions":
        cont = " ".join(draw_task(facts, rng).prompt for _ in range(rng.randint(1, 2)))
    elif kind == "wrong":
        cont = write(task, "Helpful", facts, rng, correct=False)
    elif kind == "answer":
        cont = write(task, "Helpful", facts, rng)
    else:
        cont = write(task, kind, facts, rng)
    return f"{task.prompt}\n{cont}"


def _faq_page(facts, rng) -> str:
    """A page of questions, each answered well, a blank line between them: the web's few-shot
    prompt, from which a base model learns that an answered question is followed by another
    one answered (what GPT-prompted's prefix relies on, §3.5)."""
    tasks = [draw_task(facts, rng) for _ in range(rng.randint(2, 4))]
    return SHOT_SEP.join(t.prompt + SEP + write(t, "Helpful", facts, rng) for t in tasks)


MYTH_SHARE = 0.05
"""Share of web pages about the held-out entities, where a myth outnumbers the truth (TruthfulQA's
imitative falsehoods: what the web says often, a model that imitates it repeats; §4.2)."""


def web_document(facts: F.Facts, rng: random.Random) -> str:
    if rng.random() < MYTH_SHARE:
        return myth_page(facts, rng)
    r = rng.random()
    if r < 0.30:
        return _encyclopedia(facts, rng)
    if r < 0.59:
        return _instruction_page(facts, rng)
    if r < 0.65:
        return _faq_page(facts, rng)
    return _capability_text(facts, rng)


def benchmarks(facts: F.Facts, seed: int, n: int) -> dict[str, list[dict]]:
    """Held-out capability items (fresh draws; the corpus only has their kind)."""
    rng = random.Random(f"bench-{seed}")
    out: dict[str, list[dict]] = {"reading": [], "arithmetic": [], "continuation": [], "cipher": []}
    for _ in range(n):  # `solved`: the item as the corpus writes one (a few-shot example)
        q, a = reading_item(facts, rng)
        out["reading"].append({"context": q, "answer": a.strip(), "solved": q + a})
        q, a = arithmetic_item(facts, rng)
        out["arithmetic"].append({"context": q, "answer": a.split()[0], "solved": q + a})
        ctx, endings, right = story_item(facts, rng)
        out["continuation"].append({"context": ctx, "endings": endings, "label": right, "solved": ctx + endings[right]})
        q, a = cipher_item(facts, rng)
        out["cipher"].append({"context": q, "answer": a.strip(" ."), "solved": q + a})
    # The pretraining distribution itself, from a stream of its own so the items above stay
    # as they were: what PPO trades away and PPO-ptx keeps (§4.2, the alignment tax).
    rng = random.Random(f"webtext-{seed}")
    out["webtext"] = [{"text": web_document(facts, rng)} for _ in range(n)]
    return out
