"""`rlhflab run`: the whole recipe on the lab world, one run directory, resumable.

    world -> pretrain (small, large) -> sft -> rm -> ppo / ppo-ptx -> eval -> report

Each stage writes its own directory under the run directory and hands off through it
only. A stage whose `summary.json` exists is finished and is not redone, so running
the same command again after an interruption carries on where it stopped (and a stage
that was interrupted mid-way resumes from its own checkpoint).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rlhflab.config import check, load_config, save_config
from rlhflab.pretrain import PretrainConfig
from rlhflab.pretrain import train as pretrain

# Overrides applied on top of the defaults, by preset. `smoke` is the one-minute check.
PRESETS: dict[str, dict] = {
    "default": {
        "pretrain_small": {"steps": 600, "batch_size": 32},
        "pretrain_large": {"steps": 600, "batch_size": 16},
    },
    "smoke": {
        "scale": "small",
        "pretrain_small": {"steps": 40, "batch_size": 16, "seq_len": 128, "eval_every": 20, "gold_prompts": 20},
        "pretrain_large": {"steps": 20, "batch_size": 8, "seq_len": 128, "eval_every": 20, "gold_prompts": 20},
    },
}


def _pretrain(size: str) -> PretrainConfig:
    return PretrainConfig(size=size)


@dataclass
class RunConfig:
    out_dir: str = "runs/lab"
    """The run directory; every stage writes a subdirectory of it."""
    seed: int = 0
    """World seed and the seed of every stage."""
    scale: Literal["lab", "small"] = "lab"
    """Lab world size ('small' only for smoke tests)."""
    pretrain_small: PretrainConfig = field(default_factory=lambda: _pretrain("small"))
    """Stage 0, the small base model (world, out_dir, size, seed are set by the pipeline)."""
    pretrain_large: PretrainConfig = field(default_factory=lambda: _pretrain("large"))
    """Stage 0, the ~10x larger base model."""

    def validate(self):
        check(self.seed >= 0, "seed", self.seed, "must be non-negative")


class Pipeline:
    def __init__(self, cfg: RunConfig):
        self.cfg, self.root = cfg, Path(cfg.out_dir)
        self.timings: dict[str, float] = {}

    def stage(self, name: str, fn) -> dict:
        """Run `fn()` unless `<root>/<name>/summary.json` says the stage already finished."""
        done = self.root / name / "summary.json"
        if done.is_file():
            print(f"[run] {name}: done already, skipped")
            return json.loads(done.read_text())
        print(f"[run] {name} ...", flush=True)
        t0 = time.time()
        fn()
        self.timings[name] = round(time.time() - t0, 1)
        print(f"[run] {name}: finished in {self.timings[name]:.0f}s", flush=True)
        return json.loads(done.read_text())

    def world(self) -> Path:
        from rlhflab.world.build import build

        path = self.root / "world"
        self.stage("world", lambda: build(path, self.cfg.seed, self.cfg.scale))
        return path

    def pretrain(self, size: str, world: Path) -> dict:
        base: PretrainConfig = getattr(self.cfg, f"pretrain_{size}")
        cfg = dataclasses.replace(base, world=str(world), out_dir=str(self.root / f"pretrain-{size}"),
                                  size=size, seed=self.cfg.seed)
        return self.stage(f"pretrain-{size}", lambda: pretrain(cfg))

    def run(self) -> dict:
        self.root.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.root / "config.yaml")
        world = self.world()
        results = {f"pretrain_{s}": self.pretrain(s, world) for s in ("small", "large")}
        return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rlhflab.cli import stage_parser

    stage_parser(parser)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="'default': the full lab run; 'smoke': a one-minute check")


def run_cli(args) -> int:
    from rlhflab.cli import load_stage_config

    if getattr(args, "help_config", False):
        return load_stage_config(RunConfig, args) or 0
    cfg = load_config(RunConfig, args.config, args.overrides, base=PRESETS[args.preset])
    results = Pipeline(cfg).run()
    for size in ("small", "large"):
        s = results[f"pretrain_{size}"]
        gold = f", gold {s['base_gold']:.3f}" if "base_gold" in s else ""
        print(f"  base {size:<5} {s['params']:>10,} params: held-out loss {s['val_loss']:.3f} "
              f"(unigram {s['unigram_loss']:.3f}){gold}")
    print(f"run directory: {cfg.out_dir}")
    return 0
