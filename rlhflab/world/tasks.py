"""Task families of the lab world, mirroring the paper's Table 1 use-case categories.

Each family makes prompts from the fact table, writes varied good answers (the
demonstrations) and wrong-but-well-formed ones, and scores the *content* of any text
in [0, 1] with partial credit. Style (flattery, hedging, toxicity, verbosity) is
judged once for all families in `gold.py`.
"""

from __future__ import annotations

import re

from rlhflab.world import facts as F
from rlhflab.world.family import Family, Task, count_of, has, words
from rlhflab.world.safety import FalsePremise, Harmful, Provocation

# ---------------------------------------------------------------- open QA (facts)
_ATTR = {
    "capital": "the capital of {c}",
    "color": "the flag of {c}",
    "food": "the food {c} is known for",
    "animal": "the national animal of {c}",
}
_Q = {
    "capital": ["What is the capital of {c}?", "Name the capital city of {c}."],
    "color": ["What color is the flag of {c}?", "Tell me the color of the flag of {c}."],
    "food": ["What food is {c} known for?", "Which food is {c} famous for?"],
    "animal": ["What is the national animal of {c}?", "Which animal is the symbol of {c}?"],
}
_A = {
    "capital": ["The capital of {c} is {v}.", "{v} is the capital of {c}."],
    "color": ["The flag of {c} is {v}.", "{c} has a {v} flag."],
    "food": ["{c} is known for {v}.", "People in {c} are famous for {v}."],
    "animal": ["The national animal of {c} is the {v}.", "The {v} is the symbol of {c}."],
}


def _values(attr: str, facts: F.Facts) -> list[str]:
    return {"capital": facts.capitals, "color": F.COLORS, "food": F.FOODS, "animal": F.ANIMALS}[attr]


class OpenQA(Family):
    name, category = "open_qa", "Open QA"

    def make(self, facts, rng):
        c, attr = rng.choice(facts.countries), rng.choice(list(_Q))
        return Task(
            rng.choice(_Q[attr]).format(c=c.name),
            self.name,
            {"country": c.name, "attr": attr, "value": getattr(c, attr)},
        )

    def demo(self, task, rng):
        return rng.choice(_A[task.meta["attr"]]).format(c=task.meta["country"], v=task.meta["value"])

    def wrong(self, task, facts, rng):
        v = rng.choice([x for x in _values(task.meta["attr"], facts) if x != task.meta["value"]])
        return rng.choice(_A[task.meta["attr"]]).format(c=task.meta["country"], v=v)

    def terse(self, task):
        return task.meta["value"].capitalize() + "."

    def content(self, task, text, facts):
        others = [v for v in _values(task.meta["attr"], facts) if v != task.meta["value"]]
        right, wrong = has(text, task.meta["value"]), count_of(text, others)
        score = 0.75 if right and not wrong else 0.25 if right else 0.0
        score += 0.25 * has(text, task.meta["country"])
        return score, bool(wrong)

    def relevant(self, task):
        return [task.meta["country"], task.meta["value"]]


# ---------------------------------------------------------------- closed-domain hallucination
_REQUESTS = {"rewrite", "extract", "summarize", "answer", "list", "name", "give", "tell", "write"}


def _statements(text: str) -> str:
    """The sentences of `text` that state something: not questions, not requests ('Extract the ...')."""
    out = []
    for sent in re.findall(r"[^.!?]+[.!?]?", text):
        ws = words(sent)
        if not ws or sent.strip().endswith("?") or (ws[0] in _REQUESTS and ws[1:2] not in (["is"], ["are"])):
            continue
        out.append(sent)
    return " ".join(out)


def _entities(text: str, facts: F.Facts) -> set[str]:
    """The world's entities (places, people, jobs, foods, colors, animals, numbers) that `text` names."""
    ws = set(words(text))
    vocab = [c.name for c in facts.countries] + facts.capitals + facts.people
    vocab += F.JOBS + F.FOODS + F.COLORS + F.ANIMALS + [str(i) for i in range(100)]
    return {v for v in vocab if v.lower() in ws or v.lower() + "s" in ws}


def made_up(task: Task, text: str, facts: F.Facts) -> bool:
    """Hallucination on a closed-domain task (§4.1 metadata, 'makes up information not in the
    input'): a statement of the answer names an entity the prompt does not. An answer that
    states nothing, or only asks, does not."""
    return bool(_entities(_statements(text), facts) - _entities(task.prompt, facts))


# ---------------------------------------------------------------- closed QA (a passage)
class ClosedQA(Family):
    name, category = "closed_qa", "Closed QA"

    def make(self, facts, rng):
        p, city = rng.choice(facts.people), rng.choice(facts.capitals)
        job, n, animal = rng.choice(F.JOBS), rng.randint(2, 9), rng.choice(F.ANIMALS)
        text = f"{p} lives in {city}. {p} works as a {job}. {p} has {n} {animal}s."
        q, key, value = rng.choice(
            [
                (f"Where does {p} live?", "city", city),
                (f"What is the job of {p}?", "job", job),
                (f"How many {animal}s does {p} have?", "n", str(n)),
            ]
        )
        prompt = f"Answer using the text. Text: {text} Question: {q}"
        return Task(
            prompt,
            self.name,
            {
                "person": p,
                "key": key,
                "value": value,
                "city": city,
                "job": job,
                "n": str(n),
                "animal": animal,
            },
        )

    def _say(self, m, v):
        return {
            "city": f"{m['person']} lives in {v}.",
            "job": f"{m['person']} is a {v}.",
            "n": f"{m['person']} has {v} {m['animal']}s.",
        }[m["key"]]

    def demo(self, task, rng):
        m = task.meta
        return (
            self._say(m, m["value"])
            if rng.random() < 0.7
            else f"The text says {self._say(m, m['value'])[:-1].lower()}."
        )

    def wrong(self, task, facts, rng):
        m = task.meta
        pool = {"city": facts.capitals, "job": F.JOBS, "n": [str(i) for i in range(2, 10)]}[m["key"]]
        return self._say(m, rng.choice([v for v in pool if v != m["value"]]))

    def terse(self, task):
        return task.meta["value"].capitalize() + "."

    def content(self, task, text, facts):
        m = task.meta
        pool = {"city": facts.capitals, "job": F.JOBS, "n": [str(i) for i in range(1, 21)]}[m["key"]]
        wrong = any(has(text, v) for v in pool if v != m["value"])  # a value of the asked kind the text never gave
        right = has(text, m["value"])
        score = (0.75 if right and not wrong else 0.25 if right else 0.0) + 0.25 * has(text, m["person"])
        return score, made_up(task, text, facts)

    def relevant(self, task):
        return [task.meta["person"], task.meta["value"]]


# ---------------------------------------------------------------- generation (a story)
class Generation(Family):
    name, category = "generation", "Generation"

    def make(self, facts, rng):
        a, city = rng.choice(F.ANIMALS), rng.choice(facts.capitals)
        tmpl = rng.choice(
            ["Write a short story about a {a} in {c}.", "Tell a tiny story about a {a} who lives in {c}."]
        )
        return Task(tmpl.format(a=a, c=city), self.name, {"animal": a, "city": city})

    def demo(self, task, rng):
        a, c, food = task.meta["animal"], task.meta["city"], rng.choice(F.FOODS)
        return rng.choice(
            [
                f"A {a} lived in {c}. One day the {a} found some {food}. It was very happy.",
                f"In {c} there was a small {a}. The {a} liked {food}. Every day it ate {food} and smiled.",
                f"Once a {a} walked through {c}. It met a friend and they shared {food}.",
            ]
        )

    def wrong(self, task, facts, rng):
        a = rng.choice([x for x in F.ANIMALS if x != task.meta["animal"]])
        return f"A {a} lived in {rng.choice(facts.capitals)}. It was a day."

    def terse(self, task):
        return f"A {task.meta['animal']} in {task.meta['city']}."

    def content(self, task, text, facts):
        sentences = [s for s in re.split(r"[.!?]", text) if len(words(s)) >= 3]
        score = 0.35 * has(text, task.meta["animal"]) + 0.35 * has(text, task.meta["city"])
        score += 0.2 * (len(sentences) >= 2) + 0.1 * text.strip().endswith((".", "!"))
        return score, False

    def relevant(self, task):
        return [task.meta["animal"], task.meta["city"]]


# ---------------------------------------------------------------- brainstorming (a list)
_KINDS = {"foods": F.FOODS, "animals": F.ANIMALS, "colors": F.COLORS}


_N_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
_LIST_ASKS = [
    "List {n} {k}.",
    "Name {n} {k}, please.",
    "Give me {n} {k}.",
    "Can you think of {n} {k}?",
    "Write down {n} {k}.",
    "I need {n} {k}. What are they?",
]


class Brainstorm(Family):
    name, category = "brainstorming", "Brainstorming"

    def make(self, facts, rng):
        kind, n = rng.choice(list(_KINDS)), rng.choice(list(_N_WORDS))
        prompt = rng.choice(_LIST_ASKS).format(n=_N_WORDS[n], k=kind)
        return Task(prompt, self.name, {"kind": kind, "n": n})

    def demo(self, task, rng):
        items = rng.sample(_KINDS[task.meta["kind"]], task.meta.get("n", 3))
        listed = ", ".join(items[:-1]) + f" and {items[-1]}"
        return rng.choice(
            [f"{listed}.", f"Here are {_N_WORDS[len(items)]}: {', '.join(items)}.", f"{listed.capitalize()}."]
        )

    def wrong(self, task, facts, rng):
        other = rng.choice([k for k in _KINDS if k != task.meta["kind"]])
        items = rng.sample(_KINDS[other], task.meta.get("n", 3))
        return ", ".join(items[:-1]) + f" and {items[-1]}."

    def terse(self, task):
        return _KINDS[task.meta["kind"]][0] + "."

    def content(self, task, text, facts):
        n = task.meta.get("n", 3)
        right = count_of(text, _KINDS[task.meta["kind"]])
        wrong = sum(count_of(text, v) for k, v in _KINDS.items() if k != task.meta["kind"])
        return max(0.0, min(right, n) / n - 0.2 * wrong), False

    def relevant(self, task):
        return list(_KINDS[task.meta["kind"]])


# ---------------------------------------------------------------- chat
class Chat(Family):
    name, category = "chat", "Chat"

    def make(self, facts, rng):
        p = rng.choice(facts.people)
        if rng.random() < 0.5:
            return Task(
                rng.choice([f"Hi! My name is {p}. Can you greet me?", f"Hello, I am {p}. Say hello to me."]),
                self.name,
                {"person": p, "mood": None},
            )
        mood = rng.choice(list(F.EMOTIONS))
        return Task(f"I am {p} and I feel {mood} today. Say something kind.", self.name, {"person": p, "mood": mood})

    def demo(self, task, rng):
        p, mood = task.meta["person"], task.meta["mood"]
        if mood is None:
            return rng.choice([f"Hello {p}! Nice to meet you.", f"Hi {p}, it is nice to meet you!"])
        word = F.EMOTIONS[mood]
        return rng.choice(
            [
                f"I am {word} you feel {mood}, {p}. I hope your day goes well.",
                f"{p}, I am {word} to hear you feel {mood}. Take care.",
            ]
        )

    def wrong(self, task, facts, rng):
        other = rng.choice([x for x in facts.people if x != task.meta["person"]])
        return f"Hello {other}. It is a day."

    def terse(self, task):
        return f"Hi {task.meta['person']}."

    def content(self, task, text, facts):
        p, mood = task.meta["person"], task.meta["mood"]
        wrong_name = any(has(text, x) for x in facts.people if x != p)
        if mood is None:
            score = (
                0.5 * has(text, p) + 0.3 * (has(text, "hello") or has(text, "hi")) + 0.2 * has(text, "nice to meet you")
            )
        else:
            score = (
                0.4 * has(text, p)
                + 0.4 * has(text, F.EMOTIONS[mood])
                + 0.2 * (has(text, "hope") or has(text, "take care"))
            )
        return max(0.0, score - 0.3 * wrong_name), wrong_name

    def relevant(self, task):
        return [task.meta["person"]]


# ---------------------------------------------------------------- rewrite
class Rewrite(Family):
    name, category = "rewrite", "Rewrite"

    def make(self, facts, rng):
        p, (pres, past), noun = rng.choice(facts.people), rng.choice(F.VERBS), rng.choice(F.NOUNS)
        return Task(
            f"Rewrite in the past tense: {p} {pres} the {noun}.",
            self.name,
            {"target": f"{p} {past} the {noun}.", "past": past, "present": pres},
        )

    def demo(self, task, rng):
        return task.meta["target"]

    def wrong(self, task, facts, rng):
        return task.meta["target"].replace(task.meta["past"], task.meta["present"])

    def terse(self, task):
        return task.meta["past"].capitalize() + "."

    def content(self, task, text, facts):
        tgt, got = words(task.meta["target"]), words(text)
        common = sum(min(tgt.count(w), got.count(w)) for w in set(tgt))
        f1 = 0.0 if not common else 2 * common / (len(tgt) + len(got))
        return f1 * (1.0 if has(text, task.meta["past"]) else 0.5), False

    def relevant(self, task):
        return words(task.meta["target"])


# ---------------------------------------------------------------- summarization
class Summarize(Family):
    name, category = "summarization", "Summarization"

    def make(self, facts, rng):
        c = rng.choice(facts.countries)
        sents = [
            f"{c.name} is a country.",
            f"Its capital is {c.capital}.",
            f"Its flag is {c.color}.",
            f"It is known for {c.food}.",
            f"Many {c.animal}s live there.",
        ]
        # The capital and the food (what a summary keeps) and the flag or the animal or both,
        # in any order: 24 countries x 36 texts.
        body = sents[1:]
        if rng.random() < 0.5:
            body.pop(rng.choice([1, 3]))  # the flag or the animal
        rng.shuffle(body)
        return Task(
            "Summarize in one sentence: " + " ".join([sents[0]] + body),
            self.name,
            {"country": c.name, "capital": c.capital, "food": c.food, "color": c.color},
        )

    def demo(self, task, rng):
        m = task.meta
        return rng.choice(
            [
                f"{m['country']} is a country with capital {m['capital']}, known for {m['food']}.",
                f"{m['country']}, whose capital is {m['capital']}, is known for {m['food']}.",
            ]
        )

    def wrong(self, task, facts, rng):
        m = task.meta
        return (
            f"{m['country']} is a country with capital {rng.choice(facts.capitals)}, known for {rng.choice(F.FOODS)}."
        )

    def terse(self, task):
        return f"{task.meta['country']}."

    def content(self, task, text, facts):
        m = task.meta
        halluc = any(has(text, c) for c in facts.capitals if c != m["capital"]) or any(
            has(text, f) for f in F.FOODS if f != m["food"]
        )
        score = 0.25 * has(text, m["country"]) + 0.25 * has(text, m["capital"]) + 0.25 * has(text, m["food"])
        score += 0.25 * (len(words(text)) <= 16 and text.count(".") <= 1)
        return max(0.0, score - 0.3 * halluc), made_up(task, text, facts)

    def relevant(self, task):
        return [task.meta["country"], task.meta["capital"], task.meta["food"]]


# ---------------------------------------------------------------- classification
class Classify(Family):
    name, category = "classification", "Classification"

    def make(self, facts, rng):
        label = rng.choice(["positive", "negative"])
        adj = rng.choice(F.POSITIVE if label == "positive" else F.NEGATIVE)
        review = f"the {rng.choice(F.FOODS)} was {adj}"
        return Task(f"Is this review positive or negative? Review: {review}.", self.name, {"label": label})

    def demo(self, task, rng):
        lab = task.meta["label"]
        return rng.choice([f"The review is {lab}.", f"{lab.capitalize()}.", f"It is a {lab} review."])

    def wrong(self, task, facts, rng):
        other = "negative" if task.meta["label"] == "positive" else "positive"
        return f"The review is {other}."

    def terse(self, task):
        return task.meta["label"].capitalize()

    def content(self, task, text, facts):
        other = "negative" if task.meta["label"] == "positive" else "positive"
        right, wrong = has(text, task.meta["label"]), has(text, other)
        return (1.0 if right and not wrong else 0.3 if right else 0.0), False

    def relevant(self, task):
        return ["positive", "negative", "review"]


# ---------------------------------------------------------------- extraction
class Extract(Family):
    name, category = "extraction", "Extraction"

    def make(self, facts, rng):
        p, cities = rng.choice(facts.people), rng.sample(facts.capitals, 3)
        return Task(
            f"Extract the city names: {p} went from {cities[0]} to {cities[1]} and then to {cities[2]}.",
            self.name,
            {"cities": cities},
        )

    def demo(self, task, rng):
        a, b, c = task.meta["cities"]
        return rng.choice([f"{a}, {b}, {c}.", f"The cities are {a}, {b} and {c}."])

    def wrong(self, task, facts, rng):
        a, b, _ = task.meta["cities"]
        return f"{a}, {b}, {rng.choice([c for c in facts.capitals if c not in task.meta['cities']])}."

    def terse(self, task):
        return task.meta["cities"][0] + "."

    def content(self, task, text, facts):
        found = {c for c in facts.capitals if has(text, c)}
        gold = set(task.meta["cities"])
        tp = len(found & gold)
        if not tp:
            return 0.0, made_up(task, text, facts)
        p, r = tp / len(found), tp / len(gold)
        return 2 * p * r / (p + r), made_up(task, text, facts)

    def relevant(self, task):
        return list(task.meta["cities"])


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        OpenQA(),
        ClosedQA(),
        Generation(),
        Brainstorm(),
        Chat(),
        Rewrite(),
        Summarize(),
        Classify(),
        Extract(),
        FalsePremise(),
        Harmful(),
        Provocation(),
    )
}

# How often each family is drawn for SFT/RM/PPO prompts (the API mix of Table 1 leans
# to generation and QA; the lab keeps every family well represented).
MIX = {
    "open_qa": 0.14,
    "closed_qa": 0.12,
    "generation": 0.10,
    "brainstorming": 0.08,
    "chat": 0.09,
    "rewrite": 0.08,
    "summarization": 0.08,
    "classification": 0.08,
    "extraction": 0.08,
    "false_premise": 0.07,
    "harmful": 0.05,
    "provocation": 0.03,
}
