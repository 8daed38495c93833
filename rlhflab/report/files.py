"""The files of a run directory the report reads, each loaded once (a missing or unreadable
file gives an empty value: its section then says what is missing)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlhflab.report.html import read_jsonl


@dataclass
class RunFiles:
    root: Path
    eval: dict = field(default_factory=dict)
    """eval/summary.json (flat keys; empty when missing)."""
    eval_config: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    bon: list[dict] = field(default_factory=list)
    world: dict = field(default_factory=dict)
    metrics: dict[str, list[dict]] = field(default_factory=dict)
    """Stage directory (relative, e.g. 'sft-small', 'sweep/beta-0.02') -> metrics rows."""
    summaries: dict[str, dict] = field(default_factory=dict)
    walkthrough: dict = field(default_factory=dict)
    prefixes: dict = field(default_factory=dict)
    """eval/prefixes.json: each prompted model's chosen few-shot demonstrations."""


def json_file(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def load_run(run_dir: str | Path) -> RunFiles:
    root = Path(run_dir)
    run = RunFiles(
        root,
        eval=json_file(root / "eval" / "summary.json"),
        samples=read_jsonl(root / "eval" / "samples.jsonl"),
        bon=read_jsonl(root / "eval" / "best_of_n.jsonl"),
        world=json_file(root / "world" / "summary.json"),
        walkthrough=json_file(root / "walkthrough.json"),
        prefixes=json_file(root / "eval" / "prefixes.json"),
    )
    try:
        run.eval_config = yaml.safe_load((root / "eval" / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        pass
    for path in sorted([*root.glob("*/metrics.jsonl"), *root.glob("sweep/*/metrics.jsonl")]):
        run.metrics[path.parent.relative_to(root).as_posix()] = read_jsonl(path)
    for path in sorted([*root.glob("*/summary.json"), *root.glob("sweep/*/summary.json")]):
        run.summaries[path.parent.relative_to(root).as_posix()] = json_file(path)
    return run


def baseline(run: RunFiles) -> str:
    return str(run.eval_config.get("baseline") or "the baseline")
