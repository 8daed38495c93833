"""The same seed and thread count give byte-identical stage outputs; another seed does not.

Compared: every file a stage writes as its result (model weights, model config,
tokenizer), and metrics.jsonl and summary.json without their wall-clock fields.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from rlhflab.io import read_metrics
from rlhflab.models import load_reward_model
from rlhflab.stages import rm, sft
from rlhflab.stages.ppo import loop as ppo_loop
from rlhflab.stages.ppo import step as ppo

from tiny import demo_rows, gpt2_dir, make, ranking_rows, tiny_tokenizer, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

TIMING = ("time/", "seconds", "time_s")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    tok = tiny_tokenizer()
    base = gpt2_dir(root / "gpt2", tok, n_positions=64)
    torch.manual_seed(0)
    load_reward_model(base).save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    return {
        "root": root,
        "base": base,
        "rm": root / "rm",
        "demos": write_jsonl(root / "demos.jsonl", demo_rows(12)),
        "val": write_jsonl(root / "val.jsonl", demo_rows(16)[12:]),
        "ranks": write_jsonl(root / "ranks.jsonl", ranking_rows(12)),
        "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": f"name a color {i}"} for i in range(16)]),
    }


def run_sft(lab, out: Path, seed: int) -> list[Path]:
    sft.train(
        make(
            sft.SFTConfig,
            base=str(lab["base"]),
            data=str(lab["demos"]),
            val_data=str(lab["val"]),
            out_dir=str(out),
            epochs=2,
            batch_size=4,
            seed=seed,
            device="cpu",
        )
    )
    return [out / "model"]


def run_rm(lab, out: Path, seed: int) -> list[Path]:
    rm.train(
        make(
            rm.RMConfig,
            base=str(lab["base"]),
            rankings=str(lab["ranks"]),
            demos=str(lab["demos"]),
            out_dir=str(out),
            batch_size=4,
            seed=seed,
            device="cpu",
        )
    )
    return [out / "model"]


def run_ppo(lab, out: Path, seed: int) -> list[Path]:
    ppo_loop.train(
        make(
            ppo.PPOConfig,
            policy=str(lab["base"]),
            reward_model=str(lab["rm"]),
            prompts=str(lab["prompts"]),
            batch_size=8,
            minibatch_size=4,
            ppo_epochs=2,
            max_new_tokens=6,
            total_episodes=16,
            lr=1e-3,
            warmup_steps=0,
            seed=seed,
            device="cpu",
            out_dir=str(out),
        )
    )
    return [out / "policy", out / "value"]


def fingerprint(out: Path, model_dirs: list[Path]) -> dict:
    """sha256 of every output model file; metrics and summary without timing fields."""
    files = {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for d in model_dirs
        for p in sorted(d.iterdir())
    }
    untimed = lambda row: {k: v for k, v in row.items() if not k.startswith(TIMING)}
    summary = json.loads((out / "summary.json").read_text())
    return {
        "files": files,
        "metrics": [untimed(r) for r in read_metrics(out / "metrics.jsonl")],
        "summary": untimed({k: v for k, v in summary.items() if k != "final"}),
    }


@pytest.mark.slow
@pytest.mark.parametrize("stage", [run_sft, run_rm, run_ppo], ids=["sft", "rm", "ppo"])
def test_same_seed_same_bytes_other_seed_other_weights(lab, tmp_path, stage):
    a = fingerprint(tmp_path / "a", stage(lab, tmp_path / "a", seed=3))
    b = fingerprint(tmp_path / "b", stage(lab, tmp_path / "b", seed=3))
    c = fingerprint(tmp_path / "c", stage(lab, tmp_path / "c", seed=4))
    assert any(name.endswith("model.safetensors") for name in a["files"])
    assert a == b
    weights = [name for name in a["files"] if name.endswith(".safetensors")]
    assert all(a["files"][n] != c["files"][n] for n in weights)  # the seed matters
    assert a["metrics"] != c["metrics"]
