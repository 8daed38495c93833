"""The base of the lab world's task families: a Task (one prompt with the facts its answers
are judged against), the Family interface each family implements, and the word matching
every family's content score uses."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from rlhflab.world import facts as F


@dataclass
class Task:
    prompt: str
    family: str
    meta: dict = field(default_factory=dict)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def has(text: str, phrase: str) -> bool:
    """Whole-word, case-insensitive phrase match."""
    return f" {' '.join(words(phrase))} " in f" {' '.join(words(text))} "


def count_of(text: str, options) -> int:
    return sum(has(text, o) for o in options)


class Family:
    name = ""
    category = ""
    """The paper's Table 1 category this family stands for."""

    def make(self, facts: F.Facts, rng: random.Random) -> Task: ...
    def demo(self, task: Task, rng: random.Random) -> str: ...
    def wrong(self, task: Task, facts: F.Facts, rng: random.Random) -> str: ...
    def terse(self, task: Task) -> str: ...
    def content(self, task: Task, text: str, facts: F.Facts) -> tuple[float, bool]:
        """(content score in [0,1], hallucination flag)."""

    def relevant(self, task: Task) -> list[str]:
        """Words whose presence shows a response engages with the task at all."""
