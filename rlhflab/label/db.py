"""The labeling store: one SQLite file in WAL mode with synchronous=FULL.

A label is acknowledged only after its COMMIT returns, and with synchronous=FULL the
WAL is fsynced at every commit, so an acknowledged label survives kill -9 (and a power
cut). UNIQUE(labeler, item) makes "one label per labeler per task" a database fact,
not a hope. Tokens are stored as SHA-256 hashes: they are 192-bit random strings, so
a fast hash is enough, and a leaked database file leaks no usable token.

Vocabulary: an *item* is one prompt to label (kind "rank": a prompt and K responses;
kind "demo": a prompt to answer); a *task* is an item assigned to a labeler, and is
addressed by the item id. Labels are final: an identical resubmission is acknowledged
as a duplicate, a different one is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import queue
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from rlhflab.data import iter_jsonl, pair_agreement, parse_ranking
from rlhflab.errors import InputError
from rlhflab.io import write_jsonl

SCHEMA_VERSION = 1
MAX_COMPLETION = 20_000  # characters in one written demonstration
MAX_NAME = 64
# The paper's per-output metadata (Ouyang et al. 2022, Table 3 / Appendix B.2).
FLAGS = {
    "fails_instruction": "Fails to follow the instruction",
    "hallucination": "Hallucination",
    "inappropriate": "Inappropriate for a customer assistant",
    "toxic": "Toxic, violent or sexual content",
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS labelers (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    token_hash  TEXT NOT NULL UNIQUE,
    created     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    id          INTEGER PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('rank', 'demo')),
    prompt      TEXT NOT NULL,
    responses   TEXT,                   -- JSON list of K strings (rank items only)
    key         TEXT NOT NULL UNIQUE,   -- content hash: loading a file twice adds nothing
    source      TEXT NOT NULL,          -- file:line it was loaded from
    created     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    item        INTEGER NOT NULL REFERENCES items(id),
    labeler     INTEGER NOT NULL REFERENCES labelers(id),
    PRIMARY KEY (labeler, item)
);
CREATE TABLE IF NOT EXISTS labels (
    id          INTEGER PRIMARY KEY,
    item        INTEGER NOT NULL REFERENCES items(id),
    labeler     INTEGER NOT NULL REFERENCES labelers(id),
    payload     TEXT NOT NULL,          -- canonical JSON of the validated label
    created     REAL NOT NULL,
    UNIQUE (labeler, item),
    FOREIGN KEY (labeler, item) REFERENCES assignments(labeler, item)
);
CREATE INDEX IF NOT EXISTS labels_by_item ON labels(item);
"""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class LabelDB:
    """Thread-safe access to one labeling database.

    Writes go through one connection under a lock: SQLite has one writer anyway, and a
    Python lock hands over at once where SQLite's busy handler sleeps and retries.
    BEGIN IMMEDIATE also serializes against other processes (the CLI while the server
    runs). Reads use a small pool of connections, each a consistent WAL snapshot.
    """

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise InputError(
                "no labeling database here (create one with `rlhflab label add-labeler` or `load`)",
                file=str(self.path),
            )
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._pool: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._writer = self._connect()
        self._init_schema()

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 30000")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as e:
            raise InputError(f"cannot open as SQLite: {e}", file=str(self.path)) from None
        return conn

    def _init_schema(self) -> None:
        c = self._writer
        try:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as e:
            raise InputError(f"not an SQLite database ({e})", file=str(self.path)) from None
        if version == 0 and tables:
            raise InputError("an SQLite file, but not an rlhflab labeling database", file=str(self.path))
        if version > SCHEMA_VERSION:
            raise InputError(
                f"database schema {version} is newer than this rlhflab ({SCHEMA_VERSION})",
                file=str(self.path),
            )
        c.execute("PRAGMA journal_mode = WAL")  # persistent: recorded in the file
        with self.write() as w:
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                w.execute(stmt)
            w.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self._writer.close()
        while not self._pool.empty():
            self._pool.get_nowait().close()

    # -- connections ---------------------------------------------------------------

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A pooled connection inside one read transaction (a consistent snapshot)."""
        try:
            conn = self._pool.get_nowait()
        except queue.Empty:
            conn = self._connect()
        try:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")
        finally:
            if self._pool.qsize() < 32:
                self._pool.put(conn)
            else:
                conn.close()

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; it is durable on disk when the block exits."""
        with self._write_lock:
            c = self._writer
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:  # also when COMMIT itself failed (disk full, I/O error)
                    c.execute("ROLLBACK")
                raise

    # -- labelers ------------------------------------------------------------------

    def add_labeler(self, name: str, *, reissue: bool = False) -> str:
        """Create a labeler (or give an existing one a new token); return the token."""
        name = name.strip()
        if not name or len(name) > MAX_NAME or not re.fullmatch(r"[\w.@+-]+", name):
            raise InputError(f"labeler name must be 1-{MAX_NAME} letters, digits or . @ + - _, got {name!r}")
        token = secrets.token_urlsafe(24)
        with self.write() as c:
            exists = c.execute("SELECT 1 FROM labelers WHERE name = ?", (name,)).fetchone()
            if exists and not reissue:
                raise InputError(f"labeler {name!r} already exists (--reissue gives a new token)")
            if not exists and reissue:
                raise InputError(f"no labeler {name!r} to reissue a token for")
            if exists:
                c.execute("UPDATE labelers SET token_hash = ? WHERE name = ?", (hash_token(token), name))
            else:
                c.execute(
                    "INSERT INTO labelers (name, token_hash, created) VALUES (?, ?, ?)",
                    (name, hash_token(token), time.time()),
                )
        return token

    def labeler_for_token(self, token: str) -> tuple[int, str] | None:
        with self.read() as c:
            row = c.execute("SELECT id, name FROM labelers WHERE token_hash = ?", (hash_token(token),)).fetchone()
        return (row[0], row[1]) if row else None

    # -- loading -------------------------------------------------------------------

    def load(self, kind: str, path: str | Path, per_item: int = 1) -> tuple[int, int]:
        """Load items from JSONL and assign each to `per_item` labelers, in one transaction.

        Every row is validated before anything is written. Items already in the database
        (same kind and content) are skipped. Returns (added, skipped).
        """
        if kind not in ("rank", "demo"):
            raise ValueError(f"kind must be 'rank' or 'demo', got {kind!r}")
        rows = read_items(kind, path)
        if per_item < 1:
            raise InputError(f"--per-item must be at least 1, got {per_item}")
        added = skipped = 0
        with self.write() as c:
            labelers = [r[0] for r in c.execute("SELECT id FROM labelers ORDER BY id")]
            if len(labelers) < per_item:
                raise InputError(
                    f"--per-item {per_item} needs at least {per_item} labelers, "
                    f"found {len(labelers)} (add them with `rlhflab label "
                    f"add-labeler` first)"
                )
            load = dict.fromkeys(labelers, 0)
            for lab, n in c.execute("SELECT labeler, COUNT(*) FROM assignments GROUP BY labeler"):
                load[lab] = n
            co: dict[tuple[int, int], int] = {}
            for x, y, n in c.execute(
                "SELECT a.labeler, b.labeler, COUNT(*) FROM assignments a JOIN assignments b "
                "ON a.item = b.item AND a.labeler < b.labeler GROUP BY 1, 2"
            ):
                co[(x, y)] = n
            now = time.time()
            for prompt, responses, line in rows:
                resp_json = None if responses is None else json.dumps(responses, ensure_ascii=False)
                key = hashlib.sha256(json.dumps([kind, prompt, responses]).encode()).hexdigest()
                cur = c.execute(
                    "INSERT OR IGNORE INTO items (kind, prompt, responses, key, "
                    "source, created) VALUES (?, ?, ?, ?, ?, ?)",
                    (kind, prompt, resp_json, key, f"{path}:{line}", now),
                )
                if cur.rowcount == 0:
                    skipped += 1
                    continue
                added += 1
                for lab in choose_labelers(labelers, per_item, load, co):
                    c.execute("INSERT INTO assignments (item, labeler) VALUES (?, ?)", (cur.lastrowid, lab))
        return added, skipped

    # -- tasks and labels ----------------------------------------------------------

    def tasks(self, labeler: int) -> list[dict]:
        with self.read() as c:
            rows = c.execute(
                "SELECT i.id, i.kind, i.prompt, l.id IS NOT NULL FROM assignments a "
                "JOIN items i ON i.id = a.item "
                "LEFT JOIN labels l ON l.item = a.item AND l.labeler = a.labeler "
                "WHERE a.labeler = ? ORDER BY i.id",
                (labeler,),
            ).fetchall()
        return [{"id": i, "kind": k, "preview": p[:120], "done": bool(d)} for i, k, p, d in rows]

    def task(self, labeler: int, item: int) -> dict | None:
        """The task and this labeler's own label, or None if it is not theirs."""
        with self.read() as c:
            row = c.execute(
                "SELECT i.kind, i.prompt, i.responses FROM assignments a "
                "JOIN items i ON i.id = a.item WHERE a.labeler = ? AND a.item = ?",
                (labeler, item),
            ).fetchone()
            if row is None:
                return None
            label = c.execute("SELECT payload FROM labels WHERE labeler = ? AND item = ?", (labeler, item)).fetchone()
        out = {"id": item, "kind": row[0], "prompt": row[1], "label": json.loads(label[0]) if label else None}
        if row[2] is not None:
            out["responses"] = json.loads(row[2])
        return out

    def submit(self, labeler: int, item: int, body: dict) -> str:
        """Validate and store a label. Returns "stored" or "duplicate" (identical resubmission).

        Raises KeyError if the task is not this labeler's, InputError for a bad label,
        and LabelConflict for a different second label.
        """
        task = self.task(labeler, item)
        if task is None:
            raise KeyError(item)
        payload = json.dumps(validate_label(task, body), sort_keys=True, ensure_ascii=False)
        with self.write() as c:
            old = c.execute("SELECT payload FROM labels WHERE labeler = ? AND item = ?", (labeler, item)).fetchone()
            if old is None:
                c.execute(
                    "INSERT INTO labels (item, labeler, payload, created) VALUES (?, ?, ?, ?)",
                    (item, labeler, payload, time.time()),
                )
                return "stored"
        if old[0] == payload:
            return "duplicate"
        raise LabelConflict(
            f"task {item} is already labeled and labels are final; the stored label differs from this one"
        )

    # -- owner views ---------------------------------------------------------------

    def status(self) -> dict:
        """Progress per labeler and pairwise inter-labeler agreement on rank items."""
        with self.read() as c:
            items = dict(c.execute("SELECT kind, COUNT(*) FROM items GROUP BY kind").fetchall())
            people = c.execute(
                "SELECT b.name, "
                " (SELECT COUNT(*) FROM assignments a WHERE a.labeler = b.id), "
                " (SELECT COUNT(*) FROM labels l WHERE l.labeler = b.id), "
                " (SELECT MAX(created) FROM labels l WHERE l.labeler = b.id) "
                "FROM labelers b ORDER BY b.name"
            ).fetchall()
            ranked = c.execute(
                "SELECT l.item, b.name, l.payload FROM labels l JOIN items i ON i.id = l.item "
                "JOIN labelers b ON b.id = l.labeler WHERE i.kind = 'rank'"
            ).fetchall()
        by_item: dict[int, dict[str, list]] = {}
        for item, name, payload in ranked:
            by_item.setdefault(item, {})[name] = json.loads(payload)["ranking"]
        return {
            "items": {"rank": items.get("rank", 0), "demo": items.get("demo", 0)},
            "labelers": [{"name": n, "assigned": a, "done": d, "last_label": t} for n, a, d, t in people],
            "agreement": agreement(by_item),
        }

    def export(self, out_dir: str | Path) -> tuple[int, int]:
        """Write rankings.jsonl and demonstrations.jsonl (docs/design.md §3) from one snapshot."""
        with self.read() as c:
            rows = c.execute(
                "SELECT i.id, i.kind, i.prompt, i.responses, b.name, l.payload FROM labels l "
                "JOIN items i ON i.id = l.item JOIN labelers b ON b.id = l.labeler "
                "ORDER BY i.id, b.name"
            ).fetchall()
        rankings, demos = [], []
        for item, kind, prompt, responses, name, payload in rows:
            label = json.loads(payload)
            if kind == "rank":
                rankings.append(
                    {
                        "prompt": prompt,
                        "responses": json.loads(responses),
                        "ranking": label["ranking"],
                        "likert": label["likert"],
                        "flags": label["flags"],
                        "labeler": name,
                        "task": item,
                    }
                )
            else:
                demos.append({"prompt": prompt, "completion": label["completion"], "labeler": name, "task": item})
        out = Path(out_dir)
        return (
            write_jsonl(out / "rankings.jsonl", rankings),
            write_jsonl(out / "demonstrations.jsonl", demos),
        )


def choose_labelers(labelers: list[int], n: int, load: dict[int, int], co: dict[tuple[int, int], int]) -> list[int]:
    """Pick n labelers for one item, updating `load` and `co` (pair overlap counts).

    Least-loaded first keeps the work even; among equals, the one who has shared the
    fewest items with those already picked, so overlaps rotate and every labeler pair
    gets shared items to measure agreement on.
    """
    chosen: list[int] = []
    for _ in range(n):

        def cost(lab: int) -> tuple[int, int, int]:
            shared = sum(co.get((min(lab, o), max(lab, o)), 0) for o in chosen)
            return load[lab], shared, lab

        pick = min((lab for lab in labelers if lab not in chosen), key=cost)
        for o in chosen:
            pair = (min(pick, o), max(pick, o))
            co[pair] = co.get(pair, 0) + 1
        load[pick] += 1
        chosen.append(pick)
    return chosen


class LabelConflict(Exception):
    """A second, different label for a task that is already labeled."""


# -- validation --------------------------------------------------------------------


def read_items(kind: str, path: str | Path) -> list[tuple[str, list[str] | None, int]]:
    """(prompt, responses or None, line) rows to label, every row validated first.

    kind "demo": prompts `{"prompt"}`; kind "rank": sampled responses `{"prompt",
    "responses": [K strings]}` as `rlhflab sample` writes them. Extra keys are ignored.
    """
    rows = []
    for n, obj in iter_jsonl(path):
        if kind == "demo":
            rows.append((read_prompt(obj, path, n), None, n))
            continue
        # parse_ranking's checks with a placeholder ranking: one set of messages for both.
        if "responses" not in obj:
            raise InputError("missing", file=str(path), line=n, field="responses")
        row = {key: obj[key] for key in ("prompt", "responses") if key in obj}
        k = len(row["responses"]) if isinstance(row.get("responses"), list) else 0
        r = parse_ranking({**row, "ranking": list(range(k))}, path, n)
        rows.append((r.prompt, list(r.responses), n))
    if not rows:
        raise InputError("no rows", file=str(path))
    return rows


def read_prompt(obj: dict, path, line: int) -> str:
    prompt = obj.get("prompt")
    if prompt is None:
        raise InputError("missing", file=str(path), line=line, field="prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("must be a non-empty string", file=str(path), line=line, field="prompt")
    return prompt


def validate_label(task: dict, body: dict) -> dict:
    """The canonical stored form of a labeler's submission, or InputError naming the field."""
    if not isinstance(body, dict):
        raise InputError("the body must be a JSON object")
    if task["kind"] == "demo":
        _only(body, {"completion"})
        text = body.get("completion")
        if not isinstance(text, str) or not text.strip():
            raise InputError("must be a non-empty string", field="completion")
        if len(text) > MAX_COMPLETION:
            raise InputError(f"too long: {len(text)} characters, the limit is {MAX_COMPLETION}", field="completion")
        return {"completion": text}

    k = len(task["responses"])
    _only(body, {"ranking", "likert", "flags"})
    if "ranking" not in body:
        raise InputError("missing", field="ranking")
    try:
        parsed = parse_ranking({"prompt": task["prompt"], "responses": task["responses"], "ranking": body["ranking"]})
    except InputError as e:
        raise InputError(e.message, field=e.field) from None
    likert = body.get("likert")
    if not isinstance(likert, int) or isinstance(likert, bool) or not 1 <= likert <= 7:
        raise InputError(f"must be an integer from 1 to 7, got {likert!r}", field="likert")
    flags = body.get("flags", {})
    if not isinstance(flags, dict):
        raise InputError("must be an object {flag: [response indices]}", field="flags")
    clean = {}
    for name in FLAGS:
        idx = flags.get(name, [])
        if not isinstance(idx, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < k for i in idx
        ):
            raise InputError(f"must be a list of response indices 0..{k - 1}", field=f"flags.{name}")
        clean[name] = sorted(set(idx))
    unknown = sorted(set(flags) - set(FLAGS))
    if unknown:
        raise InputError(f"unknown flag {unknown[0]!r} (known: {', '.join(FLAGS)})", field="flags")
    ranking = [sorted(g) if len(g) > 1 else g[0] for g in parsed.groups]
    return {"ranking": ranking, "likert": likert, "flags": clean}


def _only(body: dict, allowed: set[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise InputError(f"unknown field (allowed: {', '.join(sorted(allowed))})", field=extra[0])


# -- agreement ---------------------------------------------------------------------


def agreement(by_item: dict[int, dict[str, list]]) -> dict:
    """Mean pairwise agreement per labeler pair and overall.

    For each item ranked by two labelers, agreement is the fraction of untied pairs they
    order the same way; a labeler pair's score is the mean over their shared items, and
    the overall score the mean over every (labeler pair, item) comparison. The paper
    reports 72.6 ± 1.5% among its training labelers (§3.4).
    """
    per_pair: dict[tuple[str, str], list[float]] = {}
    for rankings in by_item.values():
        for x, y in itertools.combinations(sorted(rankings), 2):
            agree, total = pair_agreement(rankings[x], rankings[y])
            if total:
                per_pair.setdefault((x, y), []).append(agree / total)
    scores = [s for v in per_pair.values() for s in v]
    return {
        "overall": sum(scores) / len(scores) if scores else None,
        "comparisons": len(scores),
        "pairs": [
            {"a": x, "b": y, "items": len(v), "agreement": sum(v) / len(v)} for (x, y), v in sorted(per_pair.items())
        ],
    }
