"""Runs `rlhflab` commands in forked children of one warm process (tests/test_kill_resume.py).

Importing torch and transformers takes ~4 s on 2 cores; a fresh `python -m rlhflab.cli`
per run would spend most of the kill tests' time on imports. This process imports once,
never runs a torch op itself (so no thread pool is alive when it forks), and forks one
child per job. Each child is a real process: the kill hook SIGKILLs it, not this one.

Protocol, one JSON object per line: stdin {"argv": [...], "env": {...}, "log": path};
stdout {"status": exit code, or -signal when the child was killed by a signal}.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback

os.environ["RLHFLAB_QUIET"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import torch

from rlhflab import cli

for _stage in ("sft", "rm", "ppo"):  # imported once here, so every child starts warm
    importlib.import_module(f"rlhflab.stages.{_stage}")


def child(job: dict) -> int:
    """Runs in the forked child: output to the job's log, one thread, then the command."""
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(job.get("env", {}))
    torch.set_num_threads(1)  # bitwise comparisons need one fixed thread count
    try:
        return cli.main(job["argv"])
    except BaseException:
        traceback.print_exc()
        return 99


def main() -> None:
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            rc = child(job)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"status": code}), flush=True)


if __name__ == "__main__":
    main()
