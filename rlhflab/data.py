"""The data formats of docs/design.md §3, read and validated before any work starts.

Rows come from JSON Lines (UTF-8, one object per line), a parquet file, or a directory
written by `datasets.Dataset.save_to_disk` (parquet and Arrow need pyarrow). Each row is
a plain-string row or a conversational one (TRL's formats); a conversation is a list of
{"role": "system" | "user" | "assistant", "content": str}:
  prompts         {"prompt": str} | {"prompt": [messages]} | {"messages": [...]} (ends before an answer)
  demonstrations  {"prompt": str, "completion": str} | {"messages": [...]} (ends with the
                  assistant's answer) | {"prompt": [messages], "completion": [assistant messages]}
  rankings        {"prompt", "responses": [str | assistant message, ...], "ranking": [int | [int, ...], ...]}
                  indices best first; an inner list is a tie group. Pairwise rows
                  {"prompt", "chosen", "rejected"} are read as K = 2; with no "prompt", chosen
                  and rejected are whole conversations and their shared prefix is the prompt.
  pretraining     {"text": str} rows, or a plain .txt file (one document per line)
Anthropic HH-style transcripts ("\n\nHuman: … \n\nAssistant: …") in any string field are
read as conversations. A bad row raises InputError naming the file, the row and the field.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rlhflab.errors import InputError

MAX_K = 16  # the paper ranks 4-9; user data may go a little wider
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


Prompt = str | tuple[Message, ...]
"""A plain-string prompt, or a conversation to be rendered by the tokenizer's chat template."""


@dataclass(frozen=True)
class Demo:
    prompt: Prompt
    completion: str
    line: int = 0
    conversation: tuple[Message, ...] | None = None
    """The whole conversation of a conversational row (prompt + the answer); None for strings."""


@dataclass(frozen=True)
class Ranking:
    prompt: Prompt
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


def iter_rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (row number, object) from JSONL, parquet or a `save_to_disk` directory; for
    JSONL the row number is the line number."""
    path = Path(path)
    if path.is_dir() or path.suffix in (".parquet", ".arrow"):
        yield from _iter_arrow(path)
    else:
        yield from iter_jsonl(path)


def _iter_arrow(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(
            "reading parquet or Arrow needs pyarrow: pip install 'rlhflab[data]'", file=str(path)
        ) from None
    if path.is_dir():
        files = sorted(path.glob("*.arrow"))
        if not files or not (path / "state.json").is_file():
            raise InputError(
                "not a directory written by datasets' save_to_disk (no state.json, *.arrow)", file=str(path)
            )
    elif not path.is_file():
        raise InputError("file not found", file=str(path))
    else:
        files = [path]
    n = 0
    for f in files:
        try:
            if f.suffix == ".parquet":
                table = pq.read_table(f)
            else:
                with pa.memory_map(str(f)) as source:
                    try:
                        table = pa.ipc.open_stream(source).read_all()
                    except pa.ArrowInvalid:
                        source.seek(0)
                        table = pa.ipc.open_file(source).read_all()
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"cannot read: {str(e).splitlines()[0]}", file=str(f)) from None
        for row in table.to_pylist():
            n += 1
            yield n, _present(row)


def _present(value):
    """A columnar row without the None a column holds where this row had no such key."""
    if isinstance(value, dict):
        return {k: _present(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_present(v) for v in value]
    return value


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
    return _string(obj[field], field, path, line)


def _string(value, field: str, path, line: int) -> str:
    if not isinstance(value, str):
        raise InputError(f"must be a string, got {type(value).__name__}", file=str(path), line=line, field=field)
    if not value.strip():
        raise InputError("must not be empty", file=str(path), line=line, field=field)
    return value


def _nonempty(rows: list, path) -> list:
    if not rows:
        raise InputError("no rows", file=str(path))
    return rows


# --------------------------------------------------------------------------- conversations

HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def is_hh(text: str) -> bool:
    """An Anthropic HH-style transcript: '\n\nHuman: …\n\nAssistant: …'."""
    return text.startswith("\n\nHuman:")


def parse_hh(text: str) -> tuple[Message, ...]:
    """The turns of an HH transcript; a trailing empty 'Assistant:' (the cue to answer) is dropped."""
    parts = HH_TURN.split(text)[1:]  # [role, content, role, content, ...]
    turns = [
        Message("user" if role == "Human" else "assistant", content.strip())
        for role, content in zip(parts[::2], parts[1::2])
    ]
    if turns and turns[-1].role == "assistant" and not turns[-1].content:
        turns.pop()
    return tuple(turns)


def _conversation(value, field: str, path, line: int) -> tuple[Message, ...]:
    """A list of {"role", "content"} messages (or an HH transcript), checked message by message."""
    if isinstance(value, str) and is_hh(value):
        value = [{"role": m.role, "content": m.content} for m in parse_hh(value)]
    if not isinstance(value, list):
        raise InputError(
            f"must be a string or a list of messages, got {type(value).__name__}",
            file=str(path),
            line=line,
            field=field,
        )
    if not value:
        raise InputError("empty conversation", file=str(path), line=line, field=field)
    out = []
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise InputError("must be a {'role', 'content'} object", file=str(path), line=line, field=where)
        if m.get("role") is None:
            raise InputError("missing", file=str(path), line=line, field=f"{where}.role")
        if m["role"] not in ROLES:
            raise InputError(
                f"unknown role {m['role']!r} (known: {', '.join(ROLES)})",
                file=str(path),
                line=line,
                field=f"{where}.role",
            )
        if "content" not in m:
            raise InputError("missing", file=str(path), line=line, field=f"{where}.content")
        if not isinstance(m["content"], str):
            raise InputError(
                f"must be a string, got {type(m['content']).__name__}",
                file=str(path),
                line=line,
                field=f"{where}.content",
            )
        out.append(Message(m["role"], m["content"]))
    return tuple(out)


def _prompt(obj: dict, path, line: int, field: str = "prompt") -> Prompt:
    """A prompt field: a string, an HH transcript or a conversation that awaits an answer."""
    if field not in obj:
        raise InputError("missing", file=str(path), line=line, field=field)
    value = obj[field]
    if isinstance(value, str) and not is_hh(value):
        return _string(value, field, path, line)
    conv = _conversation(value, field, path, line)
    if conv[-1].role == "assistant":
        raise InputError(
            "a prompt must end before the assistant's answer (its last message is the assistant's)",
            file=str(path),
            line=line,
            field=f"{field}[{len(conv) - 1}].role",
        )
    return conv


def _answer(value, field: str, path, line: int) -> str:
    """One response: a string, an assistant message, or a list holding one assistant message."""
    if isinstance(value, str):
        return _string(value, field, path, line)
    if isinstance(value, dict):
        value = [value]
    return _one_answer(_conversation(value, field, path, line), field, 0, path, line)


def _one_answer(messages: tuple[Message, ...], field: str, offset: int, path, line: int) -> str:
    """The content of `messages`, which must be exactly one assistant message (at `offset`)."""
    if len(messages) != 1 or messages[0].role != "assistant":
        raise InputError(
            "must be one assistant message (an assistant turn is missing or there are several)",
            file=str(path),
            line=line,
            field=field,
        )
    return _string(messages[0].content, f"{field}[{offset}].content", path, line)


def _demo(obj: dict, path, line: int) -> Demo:
    prompt = obj.get("prompt")
    if "messages" in obj:
        field, conv = "messages", _conversation(obj["messages"], "messages", path, line)
    elif prompt is not None and (not isinstance(prompt, str) or is_hh(prompt)):
        head = _prompt(obj, path, line)
        if "completion" not in obj:
            raise InputError("missing", file=str(path), line=line, field="completion")
        completion = obj["completion"]
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion.strip()}]
        field, conv = "completion", head + _conversation(completion, "completion", path, line)
    else:
        return Demo(_text(obj, "prompt", path, line), _text(obj, "completion", path, line), line)
    if conv[-1].role != "assistant":
        raise InputError(
            "the assistant turn is missing: the last message must be the assistant's answer",
            file=str(path),
            line=line,
            field=field,
        )
    _string(conv[-1].content, f"{field}: the last message's content", path, line)
    return Demo(conv[:-1], conv[-1].content, line, conv)


def prompt_json(prompt: Prompt):
    """A prompt as it is written back to JSONL: the string, or the list of messages."""
    return prompt if isinstance(prompt, str) else [{"role": m.role, "content": m.content} for m in prompt]


def read_prompts(path: str | Path) -> list[Prompt]:
    return [p for _, p in read_prompt_rows(path)]


def read_prompt_rows(path: str | Path) -> list[tuple[int, Prompt]]:
    """(row number, prompt) of every row; {"messages": [...]} is read as a prompt too."""
    rows = []
    for n, o in iter_rows(path):
        field = "messages" if "messages" in o and "prompt" not in o else "prompt"
        rows.append((n, _prompt(o, path, n, field)))
    return _nonempty(rows, path)


def read_demos(path: str | Path) -> list[Demo]:
    return _nonempty([_demo(o, path, n) for n, o in iter_rows(path)], path)


def read_rankings(path: str | Path) -> list[Ranking]:
    return _nonempty([parse_ranking(o, path, n) for n, o in iter_rows(path)], path)


def _implicit_pair(obj: dict, path, line: int) -> Ranking:
    """{"chosen": conversation, "rejected": conversation}: the shared prefix is the prompt."""
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise InputError("missing", file=str(path), line=line, field=key)
    chosen = _conversation(obj["chosen"], "chosen", path, line)
    rejected = _conversation(obj["rejected"], "rejected", path, line)
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise InputError(
            "chosen and rejected share no prefix, so there is no prompt", file=str(path), line=line, field="rejected"
        )
    answers = [_one_answer(conv[n:], key, n, path, line) for key, conv in (("chosen", chosen), ("rejected", rejected))]
    prompt = chosen[:n]
    if prompt[-1].role == "assistant":
        raise InputError("the shared prefix ends with an assistant message", file=str(path), line=line, field="chosen")
    return Ranking(prompt, tuple(answers), ((0,), (1,)), line)


def parse_ranking(obj: dict, path="<input>", line: int = 0) -> Ranking:
    if "prompt" not in obj and ("chosen" in obj or "rejected" in obj):
        return _implicit_pair(obj, path, line)
    prompt = _prompt(obj, path, line)
    if "chosen" in obj or "rejected" in obj:
        for key in ("chosen", "rejected"):
            if key not in obj:
                raise InputError("missing", file=str(path), line=line, field=key)
        chosen, rejected = (
            _answer(obj["chosen"], "chosen", path, line),
            _answer(obj["rejected"], "rejected", path, line),
        )
        return Ranking(prompt, (chosen, rejected), ((0,), (1,)), line)
    if "responses" not in obj:
        raise InputError("missing (or give chosen/rejected)", file=str(path), line=line, field="responses")
    responses = obj["responses"]
    if not isinstance(responses, list):
        raise InputError("must be a list of strings", file=str(path), line=line, field="responses")
    k = len(responses)
    if not 2 <= k <= MAX_K:
        raise InputError(f"needs 2 to {MAX_K} responses, got {k}", file=str(path), line=line, field="responses")
    responses = [_answer(r, f"responses[{i}]", path, line) for i, r in enumerate(responses)]
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


def read_samples(path: str | Path) -> list[tuple[int, Prompt, tuple[str, ...]]]:
    """(line, prompt, responses) of each row {"prompt", "responses": [...]}: what `rlhflab sample`
    writes (a rankings file fits too, its ranking unread)."""
    rows = []
    for line, obj in iter_rows(path):
        prompt = _prompt(obj, path, line)
        responses = obj.get("responses")
        if not isinstance(responses, list) or not responses:
            raise InputError("must be a non-empty list of strings", file=str(path), line=line, field="responses")
        rows.append((line, prompt, tuple(_answer(r, f"responses[{i}]", path, line) for i, r in enumerate(responses))))
    return _nonempty(rows, path)


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
    return _nonempty([_text(o, "text", path, n) for n, o in iter_rows(path)], path)


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
