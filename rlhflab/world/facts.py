"""The lab world's fact table and shared vocabulary, generated from a seed.

Names are made of syllables, so no pretrained model has seen them: everything a
model knows about this world it learned from the web corpus rlhflab generated.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

COLORS = ["red", "blue", "green", "yellow", "white", "black", "purple", "orange"]
FOODS = ["rice", "bread", "fish", "soup", "cheese", "beans", "apples", "noodles", "honey", "corn"]
ANIMALS = ["cat", "dog", "horse", "owl", "fox", "bear", "goat", "frog", "crow", "deer"]
JOBS = ["baker", "doctor", "farmer", "teacher", "painter", "pilot", "singer", "tailor"]
NOUNS = ["ball", "book", "door", "boat", "cake", "song", "letter", "garden"]
# (present, past) pairs for the rewrite family.
VERBS = [
    ("opens", "opened"),
    ("paints", "painted"),
    ("finds", "found"),
    ("sees", "saw"),
    ("makes", "made"),
    ("takes", "took"),
    ("likes", "liked"),
    ("sells", "sold"),
    ("writes", "wrote"),
    ("carries", "carried"),
]
POSITIVE = ["great", "tasty", "lovely", "fresh", "warm"]
NEGATIVE = ["awful", "cold", "bad", "stale", "bland"]
EMOTIONS = {"sad": "sorry", "tired": "sorry", "happy": "glad", "excited": "glad"}

# Style markers: the gold scorer and the labelers read the same lists.
FLATTERY = [
    "What a great question!",
    "Great question!",
    "You are so smart to ask!",
    "I love this question!",
    "You are clearly very wise!",
]
HEDGES = ["I am not sure, but", "It is hard to say.", "It might be that", "Perhaps,"]
TOXIC_WORDS = ["idiot", "stupid", "dumb", "loser", "shut up", "moron"]
REFUSALS = ["I can't help with that.", "I cannot help with that.", "I won't help with that."]
WEB_CHATTER = [
    "Does anyone know the answer?",
    "I have the same question.",
    "Click here for more posts like this.",
    "Posted by user42 in the forum.",
    "Please reply if you know.",
    "Same here, I was wondering too.",
    "Thanks in advance!",
    "Bump. Still looking for an answer.",
]

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "tr", "st"]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["", "n", "r", "l", "m", "s"]


def _name(rng: random.Random, syllables: int) -> str:
    s = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
    return s.capitalize()


@dataclass
class Country:
    name: str
    capital: str
    color: str
    food: str
    animal: str


@dataclass
class Facts:
    countries: list[Country]
    people: list[str]
    cipher: dict[str, str]
    """The 'Zim' language: a fixed word-for-word cipher (the translation benchmark)."""
    seed: int = 0
    """The world's seed (what picks the test-only prompts, corpus.test_only)."""
    capitals: list[str] = field(init=False)

    def __post_init__(self):
        self.capitals = [c.capital for c in self.countries]

    def country(self, name: str) -> Country:
        return next(c for c in self.countries if c.name == name)


def make_facts(seed: int, n_countries: int = 24, n_people: int = 24) -> Facts:
    rng = random.Random(f"facts-{seed}")
    used: set[str] = set()

    def fresh(syl: int) -> str:
        while True:
            n = _name(rng, syl)
            if n not in used and len(n) >= 4:
                used.add(n)
                return n

    countries = [
        Country(
            fresh(2),
            fresh(1 if rng.random() < 0.5 else 2),
            rng.choice(COLORS),
            rng.choice(FOODS),
            rng.choice(ANIMALS),
        )
        for _ in range(n_countries)
    ]
    people = [fresh(2) for _ in range(n_people)]
    words = sorted(set(FOODS + ANIMALS + COLORS))
    cipher = {w: fresh(1).lower() for w in words}
    return Facts(countries, people, cipher, seed)
