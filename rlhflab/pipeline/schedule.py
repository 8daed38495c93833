"""The stage scheduler of `rlhflab run`: jobs with the jobs they wait for, each stage in a
process of its own, side by side where neither needs the other (like make -j)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlhflab.training import cpu_cores, default_jobs


@dataclass
class Job:
    """One stage of the run: `make()` gives (fn, args) when the stage starts (its inputs
    exist by then), `needs` the stages whose directories it reads."""

    name: str
    make: Callable[[], tuple[Callable, tuple]]
    needs: tuple[str, ...] = ()


def _stage_child(conn, fn, args, env: dict, threads: int, log: str | None) -> None:
    """A stage in its own process (training.stage_context): the caller's environment, its
    thread count, its output to `log` (when it runs beside another stage), and its result
    or its own exception sent back."""
    import os
    import sys

    from rlhflab.training import apply_env

    apply_env(env, threads)
    if log is not None:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    try:
        fn(*args)
        conn.send((True, None))
    except BaseException as e:  # the parent raises it again, whole
        try:
            conn.send((False, e))
        except Exception:  # an exception that does not pickle
            conn.send((False, RuntimeError(f"{type(e).__name__}: {e}")))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


class Scheduler:
    """Runs jobs under `root`: a job whose `<root>/<name>/summary.json` exists is finished.
    `isolate`: each stage in a fresh process; `jobs`: stages side by side at most (0: auto
    for `device`)."""

    def __init__(self, root: Path, isolate: bool, jobs: int, device):
        self.root, self.isolate, self.max_jobs, self.device = Path(root), isolate, jobs, device
        self.timings: dict[str, float] = {}

    def lanes(self) -> int:
        """How many stages run side by side (`jobs`; 0: two on a CPU of two or more cores,
        one on a GPU, one when stages share this process)."""
        if not self.isolate:
            return 1
        return self.max_jobs or default_jobs(self.device)

    def stage(self, name: str, fn, *args) -> dict:
        """Run `fn(*args)` unless `<root>/<name>/summary.json` says the stage already finished."""
        self.schedule([Job(name, lambda: (fn, args))], lanes=1)
        return json.loads((self.root / name / "summary.json").read_text())

    def schedule(self, jobs: list[Job], lanes: int | None = None) -> None:
        """Run every unfinished job once its `needs` have finished, at most `lanes` at once.

        Each stage runs in a fresh process (`isolate_stages`, training.stage_context; the
        stages hand off through their directories only, docs/design.md §2). A stage that can run beside
        another (neither needs the other) gets cores // lanes threads and writes its output
        to `<root>/logs/<name>.log`; a stage every other one waits for or follows gets all
        cores and the terminal. The thread count depends on the graph only, never on
        timing, so a run is deterministic for a given `jobs`. On a stage's error the
        stages beside it are stopped (their checkpoints let a rerun resume) and the
        error is raised again here, whole.
        """
        lanes = lanes or self.lanes()
        done = set()
        for j in jobs:
            if (self.root / j.name / "summary.json").is_file():
                print(f"[run] {j.name}: done already, skipped")
                done.add(j.name)
        pending = [j for j in jobs if j.name not in done]
        if not self.isolate:
            for j in pending:
                print(f"[run] {j.name} ...", flush=True)
                t0 = time.time()
                fn, args = j.make()
                fn(*args)
                self._finished(j.name, t0)
            return
        alone = _alone(jobs)
        running: dict = {}  # connection -> (job, process, start time, log path)
        last_beat = time.time()
        try:
            while pending or running:
                for j in [j for j in pending if set(j.needs) <= done][: max(lanes - len(running), 0)]:
                    pending.remove(j)
                    running.update(self._launch(j, lanes == 1 or j.name in alone, lanes))
                if not running:
                    missing = {n for j in pending for n in j.needs} - done - {j.name for j in pending}
                    raise RuntimeError(f"stages wait on stages that are not in the run: {sorted(missing)}")
                import multiprocessing.connection

                for conn in multiprocessing.connection.wait(list(running), timeout=60):
                    job, proc, t0, log = running.pop(conn)
                    try:
                        ok, err = conn.recv()
                    except EOFError:
                        ok, err = False, None
                    proc.join()
                    if not ok:
                        if err is None:
                            where = f"; its output: {log}" if log else ""
                            err = RuntimeError(f"stage {job.name} died (exit code {proc.exitcode}){where}")
                        elif log:
                            print(f"[run] {job.name} failed; its output: {log}", flush=True)
                        raise err
                    done.add(job.name)
                    self._finished(job.name, t0)
                if any(v[3] for v in running.values()) and time.time() - last_beat >= 60:  # output in logs
                    last_beat = time.time()
                    print("[run] running: " + ", ".join(_status(*v) for v in running.values()), flush=True)
        finally:
            for _job, proc, _t0, _log in running.values():
                proc.terminate()
                proc.join()

    def _launch(self, job: Job, alone: bool, lanes: int) -> dict:
        import os

        import torch

        from rlhflab.training import stage_context

        fn, args = job.make()
        threads = torch.get_num_threads() if alone else max(1, cpu_cores() // lanes)
        log = None
        if not alone:
            log = self.root / "logs" / f"{job.name.replace('/', '-')}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
        ctx = stage_context()  # not a fork of this process: torch's OpenMP pool is not fork-safe
        parent, child = ctx.Pipe(duplex=False)
        child_args = (child, fn, args, dict(os.environ), threads, str(log) if log else None)
        proc = ctx.Process(target=_stage_child, args=child_args)
        proc.start()
        child.close()
        where = f" ({threads} thread{'s' * (threads != 1)}, output in {log})" if log else ""
        print(f"[run] {job.name} ...{where}", flush=True)
        return {parent: (job, proc, time.time(), log)}

    def _finished(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.time() - t0, 1)
        print(f"[run] {name}: finished in {self.timings[name]:.0f}s", flush=True)


def _alone(jobs: list[Job]) -> set[str]:
    """Stages that no other stage can run beside: every other one is before or after them."""
    needs = {j.name: set(j.needs) for j in jobs}

    def before(name: str) -> set[str]:
        out, todo = set(), list(needs.get(name, ()))
        while todo:
            n = todo.pop()
            if n not in out:
                out.add(n)
                todo.extend(needs.get(n, ()))
        return out

    ancestors = {n: before(n) for n in needs}
    return {n for n in needs if all(m == n or m in ancestors[n] or n in ancestors[m] for m in needs)}


def _status(job: Job, proc, t0: float, log: Path | None) -> str:
    """'ppo-small (3m 10s, 41%)': elapsed time and the last progress figure in its output."""
    import re

    s = int(time.time() - t0)
    pct = ""
    if log is not None and log.is_file():
        with open(log, "rb") as f:
            f.seek(max(log.stat().st_size - 4096, 0))
            found = re.findall(rb"(\d+)%\|", f.read())
        pct = f", {found[-1].decode()}%" if found else ""
    return f"{job.name} ({s // 60}m {s % 60:02d}s{pct})"
