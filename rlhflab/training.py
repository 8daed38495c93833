"""Small pieces every training loop shares: seeding, schedules, the NaN guard, progress."""
from __future__ import annotations

import math
import os
import random
import sys
import warnings

import torch
from tqdm import tqdm

from rlhflab.errors import InputError, TrainingError


def set_seed(seed: int) -> torch.Generator:
    """Seed python and torch; return a torch Generator for data order."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                    final_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to `final_ratio` of the peak (§C.1: to 10%)."""
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def grads_finite(params) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


class NonFiniteGuard:
    """Skip a step whose loss or gradient is not finite; stop after `patience` in a row."""

    def __init__(self, patience: int = 5, where: str = "training"):
        self.patience, self.where, self.streak, self.skipped = patience, where, 0, 0

    def ok(self, loss: torch.Tensor, params) -> bool:
        good = bool(torch.isfinite(loss).all()) and grads_finite(params)
        if good:
            self.streak = 0
            return True
        self.streak += 1
        self.skipped += 1
        warnings.warn(f"{self.where}: non-finite loss or gradient, step skipped "
                      f"({self.streak} in a row)", RuntimeWarning, stacklevel=2)
        if self.streak >= self.patience:
            raise TrainingError(f"{self.where}: {self.streak} non-finite steps in a row; "
                                "stopped, the last good checkpoint is kept")
        return False


def progress(iterable=None, total: int | None = None, desc: str = "", initial: int = 0):
    """A tqdm bar on stderr, quiet when RLHFLAB_QUIET is set (tests)."""
    disable = bool(os.environ.get("RLHFLAB_QUIET"))
    return tqdm(iterable, total=total, desc=desc, initial=initial, disable=disable,
                file=sys.stderr, dynamic_ncols=True, leave=False)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; any other name is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InputError(f"not a torch device: {name!r} (try auto, cpu, cuda)",
                         field="device") from None


def check_resumable(saved: dict, current: dict, where: str,
                    ignore=("save_every", "device")) -> None:
    """Refuse to resume a checkpoint made under another config (other data, lr, ...)."""
    for key in sorted(set(saved) | set(current)):
        if key not in ignore and saved.get(key) != current.get(key):
            raise InputError(f"the checkpoint there was made with {key}={saved.get(key)!r}, "
                             f"this run has {current.get(key)!r}; remove the checkpoint "
                             "directory or choose another out_dir", file=where, field=key)
