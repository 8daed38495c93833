"""The data formats of docs/design.md §3, read and validated before any work starts.

JSON Lines, UTF-8, one object per line:
  prompts         {"prompt": str}
  demonstrations  {"prompt": str, "completion": str}
  rankings        {"prompt": str, "responses": [str, ...], "ranking": [int | [int, ...], ...]}
                  indices best first; an inner list is a tie group. Pairwise rows
                  {"prompt", "chosen", "rejected"} are read as K = 2.
  pretraining     {"text": str} rows, or a plain .txt file (one document per line)
A bad row raises InputError naming the file, the line and the field.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rlhflab.errors import InputError

MAX_K = 16  # the paper ranks 4-9; user data may go a little wider


@dataclass(frozen=True)
class Demo:
    prompt: str
    completion: str
    line: int = 0


@dataclass(frozen=True)
class Ranking:
    prompt: str
    responses: tuple[str, ...]
    groups: tuple[tuple[int, ...], ...]
    """Indices into `responses`, best group first; responses in one group are tied."""
    line: int = 0

    def pairs(self) -> list[tuple[int, int]]:
        """All (winner, loser) pairs; ties give no pair (§3.5: ties are dropped)."""
        out = []
        for gi, gj in itertools.combinations(self.groups, 2):
            out.extend((w, lose) for w in gi for lose in gj)
        return out

    @property
    def order(self) -> list[int]:
        return [i for g in self.groups for i in g]


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; refuse bad UTF-8 or JSON."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", file=str(path))
    raw = path.read_bytes()
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"not valid UTF-8 (byte {e.start})", file=str(path), line=lineno) from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"not valid JSON: {e.msg} (column {e.colno})", file=str(path), line=lineno) from None
        if not isinstance(obj, dict):
            raise InputError("each line must be a JSON object", file=str(path), line=lineno)
        yield lineno, obj


def _text(obj: dict, field: str, path, line: int) -> str:
    if field not in obj:
        raise InputError("missing", file=str(path), line=line, field=field)
    value = obj[field]
    if not isinstance(value, str):
        raise InputError(f"must be a string, got {type(value).__name__}", file=str(path), line=line, field=field)
    if not value.strip():
        raise InputError("must not be empty", file=str(path), line=line, field=field)
    return value


def _nonempty(rows: list, path) -> list:
    if not rows:
        raise InputError("no rows", file=str(path))
    return rows


def read_prompts(path: str | Path) -> list[str]:
    return _nonempty([_text(o, "prompt", path, n) for n, o in iter_jsonl(path)], path)


def read_demos(path: str | Path) -> list[Demo]:
    return _nonempty(
        [Demo(_text(o, "prompt", path, n), _text(o, "completion", path, n), n) for n, o in iter_jsonl(path)],
        path,
    )


def read_rankings(path: str | Path) -> list[Ranking]:
    return _nonempty([parse_ranking(o, path, n) for n, o in iter_jsonl(path)], path)


def parse_ranking(obj: dict, path="<input>", line: int = 0) -> Ranking:
    prompt = _text(obj, "prompt", path, line)
    if "chosen" in obj or "rejected" in obj:
        chosen, rejected = _text(obj, "chosen", path, line), _text(obj, "rejected", path, line)
        return Ranking(prompt, (chosen, rejected), ((0,), (1,)), line)
    if "responses" not in obj:
        raise InputError("missing (or give chosen/rejected)", file=str(path), line=line, field="responses")
    responses = obj["responses"]
    if not isinstance(responses, list):
        raise InputError("must be a list of strings", file=str(path), line=line, field="responses")
    k = len(responses)
    if not 2 <= k <= MAX_K:
        raise InputError(f"needs 2 to {MAX_K} responses, got {k}", file=str(path), line=line, field="responses")
    for i, r in enumerate(responses):
        if not isinstance(r, str) or not r.strip():
            raise InputError("must be a non-empty string", file=str(path), line=line, field=f"responses[{i}]")
    if "ranking" not in obj:
        raise InputError("missing", file=str(path), line=line, field="ranking")
    ranking = obj["ranking"]
    if not isinstance(ranking, list):
        raise InputError("must be a list of indices, best first", file=str(path), line=line, field="ranking")
    groups = []
    for entry in ranking:
        members = entry if isinstance(entry, list) else [entry]
        if not members or not all(isinstance(m, int) and not isinstance(m, bool) for m in members):
            raise InputError(
                f"entries must be indices or lists of indices, got {entry!r}",
                file=str(path),
                line=line,
                field="ranking",
            )
        groups.append(tuple(members))
    flat = [i for g in groups for i in g]
    if sorted(flat) != list(range(k)):
        raise InputError(
            f"must be a permutation of 0..{k - 1}, got {ranking!r}",
            file=str(path),
            line=line,
            field="ranking",
        )
    if len(groups) < 2:
        raise InputError("all responses tied: no comparison to learn from", file=str(path), line=line, field="ranking")
    return Ranking(prompt, tuple(responses), tuple(groups), line)


def read_texts(path: str | Path) -> list[str]:
    """Pretraining text: `.txt` (one document per non-blank line) or `{"text"}` JSONL."""
    path = Path(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise InputError("file not found", file=str(path))
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            line = path.read_bytes()[: e.start].count(b"\n") + 1
            raise InputError("not valid UTF-8", file=str(path), line=line) from None
        return _nonempty([t for t in text.splitlines() if t.strip()], path)
    return _nonempty([_text(o, "text", path, n) for n, o in iter_jsonl(path)], path)


def ranking_positions(ranking: list) -> dict[int, int]:
    """Response index -> position of its group in a ranking (tied responses share one)."""
    return {i: g for g, entry in enumerate(ranking) for i in (entry if isinstance(entry, list) else [entry])}


def pair_agreement(a: list, b: list) -> tuple[int, int]:
    """(agreeing, compared) response pairs between two rankings of the same responses.

    Only pairs that neither ranking ties are compared (§3.4's inter-labeler agreement).
    """
    pa, pb = ranking_positions(a), ranking_positions(b)
    agree = total = 0
    for i, j in itertools.combinations(sorted(pa), 2):
        if pa[i] == pa[j] or pb[i] == pb[j]:
            continue
        total += 1
        agree += (pa[i] < pa[j]) == (pb[i] < pb[j])
    return agree, total
