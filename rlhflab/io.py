"""Files that are never left half-written: temp name, fsync, rename.

`atomic_dir` stages a whole output directory (a `save_pretrained` checkpoint, say)
under a temporary name and renames it into place only once it is complete, so a
reader sees either the old directory or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()

KILL_ENV = "RLHFLAB_TEST_KILL_AT"
_kill_counts: dict[str, int] = {}


def kill_point(label: str) -> None:
    """Test hook (tests/test_kill_resume.py): with RLHFLAB_TEST_KILL_AT=<label>:<n> set,
    SIGKILL this process the n-th time it passes `label`; otherwise a no-op.

    Labels: `metrics` (a metrics row was just appended), `checkpoint/partial` (a staged
    checkpoint holds its weights only), `swap:<dir name>` (inside atomic_dir's renames).
    """
    label_at, _, count = os.environ.get(KILL_ENV, "").rpartition(":")
    if label_at != label:
        return
    _kill_counts[label] = _kill_counts.get(label, 0) + 1
    if _kill_counts[label] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) for r in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def recover_dir(path: Path) -> None:
    """Repair what a kill inside `atomic_dir` left beside `path`: if the kill fell between
    its two renames, `path` is missing and `.<name>.old` is the last complete version, so
    put it back; staged temp directories are half-written, so drop them."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if old.is_dir() and not path.exists():
        os.replace(old, path)
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        kill_point(f"swap:{path.name}")  # the one moment `path` is absent: recover_dir
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class MetricsLog:
    """Append-only `metrics.jsonl`: one JSON object per logged row, flushed each time.

    A fresh run starts the file over. A resumed run keeps only the rows its checkpoint
    had seen (`keep_rows`, counted when it was saved; or, for checkpoints that did not
    count, rows with step <= `truncate_after_step`), so no row is logged twice.
    """

    def __init__(self, path: Path, truncate_after_step: int | None = None, keep_rows: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep: list[str] = []
        resumed = keep_rows is not None or truncate_after_step is not None
        if resumed and self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            if keep_rows is not None:
                keep = lines[:keep_rows]
            else:
                keep = [line for line in lines if _row_step(line) <= truncate_after_step]
        if keep:
            atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        else:
            self.path.unlink(missing_ok=True)
        self.rows = len(keep)  # rows in the file; a checkpoint records it as metrics_rows

    def log(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
        self.rows += 1
        kill_point("metrics")


def _row_step(line: str) -> float:
    try:
        return json.loads(line).get("step", -1)
    except ValueError:  # a line torn by a kill mid-write: never kept
        return float("inf")


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
