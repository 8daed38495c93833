"""The `rlhflab` command: one subcommand per stage, plus the lab-world pipeline.

Each subcommand lives in its own module, imported only when named, and exposes
`add_arguments(parser)` and `run_cli(args) -> int | None`. Stages with a config take
`--config FILE.yaml` and any number of `--key=value` overrides (dotted keys for nested
fields); `--help-config` lists every key with its default and meaning.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# rlhflab never downloads: every model and tokenizer is a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from rlhflab.errors import InputError, TrainingError

COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("rlhflab.pipeline", "the whole pipeline on the lab world, resumable stage by stage"),
    "world": ("rlhflab.world.build", "generate the lab world (tasks, corpus, labelers, splits)"),
    "pretrain": ("rlhflab.pretrain", "stage 0: pretrain a GPT-shaped base model on the web corpus"),
    "sft": ("rlhflab.sft", "stage 1: supervised fine-tuning on demonstrations"),
    "sample": ("rlhflab.sample", "K samples per prompt from a policy, ready to be ranked"),
    "rank": ("rlhflab.world.rank", "simulated labelers rank sampled responses (lab world)"),
    "rm": ("rlhflab.rm", "stage 2: reward model on K-wise rankings"),
    "ppo": ("rlhflab.ppo", "stage 3: PPO / PPO-ptx against the reward model"),
    "eval": ("rlhflab.evaluate", "the paper's evaluations on held-out prompts"),
    "bench": ("rlhflab.bench", "time fixed PPO workloads, optionally against TRL (--vs trl)"),
    "report": ("rlhflab.report", "write the self-contained HTML report of a run directory"),
    "sim": ("rlhflab.sim.server", "the interactive policy simulator (web page)"),
    "label": ("rlhflab.label.cli", "the labeling app: serve, add-labeler, load, export"),
}


def stage_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by every config-driven stage."""
    parser.add_argument("--config", help="YAML config file; --key=value overrides follow it")
    parser.add_argument("--help-config", action="store_true",
                        help="list every config key with its default and meaning, then exit")


def load_stage_config(cls, args: argparse.Namespace):
    from rlhflab.config import describe, load_config

    if getattr(args, "help_config", False):
        print("\n".join(describe(cls)))
        raise SystemExit(0)
    return load_config(cls, args.config, args.overrides)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: rlhflab COMMAND [options]   (rlhflab COMMAND --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from rlhflab import __version__
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"rlhflab: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"rlhflab {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args, unknown = parser.parse_known_args(rest)
    bad = [u for u in unknown if not (u.startswith("--") and "=" in u)]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides are --key=value)")
    args.overrides = [u[2:] for u in unknown]
    if args.overrides and not hasattr(args, "config"):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(module.run_cli(args) or 0)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
