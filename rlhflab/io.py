"""Files that are never left half-written: temp name, fsync, rename.

`atomic_dir` stages a whole output directory (a `save_pretrained` checkpoint, say)
under a temporary name and renames it into place only once it is complete, so a
reader sees either the old directory or the new one, never a torn one.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import tempfile
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from rlhflab.errors import InputError


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

    `report_to` (`run.report_to`: 'tensorboard', 'wandb', both, or 'none') sends the
    same rows to experiment trackers under the file's directory (`Trackers`); the file
    stays the record. `close()` ends them; dropping the log or exiting does too.
    """

    def __init__(
        self,
        path: Path,
        truncate_after_step: int | None = None,
        keep_rows: int | None = None,
        report_to: str | Sequence[str] = "none",
    ):
        names = check_trackers(tracker_names(report_to))  # before the file is touched
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
        self.trackers = Trackers(names, self.path.parent, [json.loads(k) for k in keep], resumed)
        # Dropped: close. At exit W&B finishes its own runs first, and TensorBoard's events are flushed.
        weakref.finalize(self, self.trackers.close).atexit = False

    def log(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
        self.trackers.log(row)
        self.rows += 1
        kill_point("metrics")

    def close(self) -> None:
        """End the trackers' runs (the file needs no closing); safe to call twice."""
        self.trackers.close()


# --------------------------------------------------------------------------- trackers

TRACKERS = ("tensorboard", "wandb")
"""What `run.report_to` may name besides 'none'; each is also the module to import and
the pip extra that installs it (rlhflab[tensorboard], rlhflab[wandb])."""


def tracker_names(report_to: str | Sequence[str]) -> list[str]:
    """`run.report_to` as a list of names: 'tensorboard,wandb' or ['wandb']; 'none' drops out."""
    items = report_to.split(",") if isinstance(report_to, str) else report_to
    names = [str(item).strip() for item in items]
    return [name for name in dict.fromkeys(names) if name and name != "none"]


def tracker_installed(name: str) -> bool:
    """Whether a tracker's package can be imported, without importing it (slow: wandb)."""
    return importlib.util.find_spec(name) is not None


def check_trackers(names: list[str]) -> list[str]:
    """`names` if each is a known, installed tracker; else an InputError naming run.report_to."""
    for name in names:
        if name not in TRACKERS:
            known = ", ".join(("none", *TRACKERS))
            raise InputError(f"unknown tracker {name!r} (known: {known})", field="run.report_to")
        if not tracker_installed(name):
            raise InputError(f"{name} is not installed: pip install 'rlhflab[{name}]'", field="run.report_to")
    return names


class Trackers:
    """The experiment trackers a MetricsLog feeds: each row's numeric values, one scalar
    per key per step (a key a row repeats at the same step keeps its first value), with
    `step` as the x axis. Opened with the rows a resumed log kept, so that each tracker
    holds exactly those before training goes on; nothing is imported unless asked for."""

    _open: dict[Path, Trackers] = {}  # by out_dir: a run that raised may not be closed yet

    def __init__(self, names: list[str], out_dir: Path, kept: list[dict], resumed: bool):
        out_dir = Path(out_dir).resolve()
        stale = Trackers._open.pop(out_dir, None)
        if stale is not None:
            stale.close()
        self.out_dir, self._step, self._keys = out_dir, None, set()
        self.open = [_TensorBoard(out_dir) if n == "tensorboard" else _WandB(out_dir, resumed) for n in names]
        if self.open:
            Trackers._open[out_dir] = self
            for row in kept:
                self._send(row)
            self._flush()

    def log(self, row: dict) -> None:
        if self.open:
            self._send(row)
            self._flush()

    def close(self) -> None:
        for tracker in self.open:
            tracker.close()
        self.open = []
        if Trackers._open.get(self.out_dir) is self:
            del Trackers._open[self.out_dir]

    def _send(self, row: dict) -> None:
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            return
        if step != self._step:
            self._step, self._keys = step, set()
        scalars = {
            k: float(v)
            for k, v in row.items()
            if k != "step" and k not in self._keys and isinstance(v, int | float) and not isinstance(v, bool)
        }
        self._keys.update(scalars)
        if scalars:
            for tracker in self.open:
                tracker.log(step, scalars)

    def _flush(self) -> None:
        for tracker in self.open:
            tracker.flush()


class _TensorBoard:
    """Event files in <out_dir>/tensorboard, written afresh each time a run starts or
    resumes (the kept rows first): no step a killed run logged past its checkpoint
    survives twice, which a `purge_step` by step alone cannot promise when a row at the
    checkpoint's own step (an epoch's evaluation) comes after it."""

    def __init__(self, out_dir: Path):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        log_dir = out_dir / "tensorboard"
        shutil.rmtree(log_dir, ignore_errors=True)
        self.writer = EventFileWriter(str(log_dir))
        self.event, self.summary = event_pb2.Event, summary_pb2.Summary

    def log(self, step: int, scalars: dict[str, float]) -> None:
        # One event per row with every key's scalar (SummaryWriter.add_scalar writes an event
        # per key, the same simple_value): several times faster to write and to replay.
        values = [self.summary.Value(tag=key, simple_value=value) for key, value in scalars.items()]
        self.writer.add_event(self.event(wall_time=time.time(), step=step, summary=self.summary(value=values)))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """A W&B run in <out_dir>/wandb, offline unless WANDB_MODE says otherwise. A resumed
    stage resumes the same run (resume="allow"; id in <out_dir>/wandb/rlhflab-run.json)
    and skips the steps it holds: the last step of the last piece that finished, or, online,
    the server's. A piece killed before it finished holds an unknown part of its rows
    (offline, W&B's own process keeps them until the run ends: most are lost), so offline
    a new run takes every kept row instead. A fresh (not resumed) stage starts a new run."""

    def __init__(self, out_dir: Path, resumed: bool):
        import wandb

        self.state = out_dir / "wandb" / "rlhflab-run.json"
        self.state.parent.mkdir(parents=True, exist_ok=True)
        mode = os.environ.get("WANDB_MODE", "offline")
        saved = _read_state(self.state) if resumed else None
        if saved is not None and saved["last_step"] is None and mode in ("offline", "dryrun"):
            saved = None  # killed offline: start a new run that gets every kept row
        self.id = saved["id"] if saved else secrets.token_hex(4)  # W&B's own ids are 8 characters too
        self.run = wandb.init(
            dir=str(out_dir),
            id=self.id,
            resume="allow",
            project=os.environ.get("WANDB_PROJECT", "rlhflab"),
            name=out_dir.name,
            mode=mode,
            reinit="create_new",  # beside, not instead of, a run the caller may hold
            settings=wandb.Settings(
                silent=True, console="off", disable_git=True, save_code=False, x_disable_stats=True
            ),
        )
        held = saved["last_step"] if saved and saved["last_step"] is not None else -1
        self.last_step = max(held, self.run.step - 1)  # online: the server's history
        self.sent_step = None  # the step this process is sending: more rows of it may follow
        self._save_state(last_step=None)  # None: not finished, what it holds is unknown
        atexit.register(self.close)  # runs before W&B's own exit hook, which would end the run under us

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if step <= self.last_step and step != self.sent_step:
            return
        self.run.log(scalars, step=step)  # rows of one step merge into one history row
        self.last_step = self.sent_step = step

    def flush(self) -> None:
        pass  # W&B's own process writes as rows come

    def close(self) -> None:
        if self.run is None:
            return
        atexit.unregister(self.close)
        self.run.finish()
        self.run = None
        self._save_state(last_step=self.last_step)

    def _save_state(self, last_step: int | None) -> None:
        atomic_write_text(self.state, json.dumps({"id": self.id, "last_step": last_step}) + "\n")


def _read_state(path: Path) -> dict | None:
    try:
        state = json.loads(path.read_text())
        last = state["last_step"]
        return {"id": str(state["id"]), "last_step": None if last is None else int(last)}
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
