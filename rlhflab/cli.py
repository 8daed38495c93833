"""The `rlhflab` command: one subcommand per stage, plus the lab-world pipeline.

Each subcommand lives in its own module, imported only when named, and exposes
`add_arguments(parser)` and `run_cli(args) -> int | None`; nothing imports this module
back. Stages with a config take `--config FILE.yaml` and any number of overrides, written
`--key=value` or `--key value` (dotted keys for nested fields); `--help` lists the keys
and `--help-config` what each means.
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
    "pretrain": ("rlhflab.stages.pretrain", "stage 0: pretrain a GPT-shaped base model on the web corpus"),
    "sft": ("rlhflab.stages.sft", "stage 1: supervised fine-tuning on demonstrations"),
    "sample": ("rlhflab.stages.sample", "K samples per prompt from a policy, ready to be ranked"),
    "rank": ("rlhflab.world.rank", "simulated labelers rank sampled responses (lab world)"),
    "rm": ("rlhflab.stages.rm", "stage 2: reward model on K-wise rankings"),
    "ppo": ("rlhflab.stages.ppo.loop", "stage 3: PPO / PPO-ptx against the reward model"),
    "eval": ("rlhflab.eval.evaluate", "the paper's evaluations (lab world), or RM win rates and KL of your models"),
    "bench": (
        "rlhflab.bench.main",
        "time fixed PPO workloads, against the matmul limit and optionally TRL (--vs trl); --rm: the RM "
        "step, padded vs packed",
    ),
    "report": ("rlhflab.report.sections", "write the self-contained HTML report of a run directory"),
    "sim": ("rlhflab.sim.server", "the interactive policy simulator (web page)"),
    "label": ("rlhflab.label.cli", "the labeling app: serve, add-labeler, load, export"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: rlhflab COMMAND [options]   (rlhflab COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def overrides(tokens: list[str]) -> list[str]:
    """Config overrides from the command line: `--key=value` or `--key value` -> 'key=value'."""
    out, i = [], 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or tok == "--":
            raise ValueError(f"unrecognized argument {tok!r} (overrides are --key=value or --key value)")
        if "=" in tok:
            out.append(tok[2:])
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            out.append(f"{tok[2:]}={tokens[i + 1]}")
            i += 2
        else:
            raise ValueError(f"{tok} needs a value (--key=value or --key value)")
    return out


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
    if unknown and not hasattr(args, "config"):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        args.overrides = overrides(unknown)
    except ValueError as e:
        parser.error(str(e))
    try:
        code = int(module.run_cli(args) or 0)
        if code == 0:
            from rlhflab import distributed

            distributed.finish()
        return code
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
