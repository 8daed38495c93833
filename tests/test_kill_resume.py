"""kill -9 at six points of SFT, RM and PPO, then the same command again: it resumes and
ends bitwise equal to an uninterrupted run, with every metrics row logged exactly once.

Each run is a real process (a fork of tests/stage_driver.py) running `rlhflab <stage>`
on one thread; the kill is rlhflab.io.kill_point, armed by RLHFLAB_TEST_KILL_AT.
"""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhflab.io import KILL_ENV, read_metrics
from rlhflab.models import load_reward_model

from tiny import demo_rows, gpt2_dir, ranking_rows, tiny_tokenizer, write_jsonl

DRIVER = Path(__file__).with_name("stage_driver.py")
TIMEOUT_S = 120


class Driver:
    """One warm stage_driver.py process; `run` forks a child per command and waits."""

    def __init__(self, logs: Path):
        self.logs, self.n = logs, 0
        self.proc = subprocess.Popen(
            [sys.executable, str(DRIVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def run(self, argv: list[str], env: dict | None = None) -> tuple[int, str]:
        """(exit status or -signal, the child's output)."""
        self.n += 1
        log = self.logs / f"run{self.n}.log"
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env or {}, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT_S)
        if not ready:
            self.close()
            pytest.fail(f"rlhflab {argv[0]} did not finish in {TIMEOUT_S}s")
        status = json.loads(self.proc.stdout.readline())["status"]
        return status, log.read_text() if log.exists() else ""

    def close(self) -> None:
        self.proc.kill()  # idle between jobs: nothing of value is lost, and no slow teardown
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    d = Driver(tmp_path_factory.mktemp("logs"))
    yield d
    d.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    tok = tiny_tokenizer()
    base = gpt2_dir(root / "gpt2", tok, n_positions=64)
    torch.manual_seed(0)
    rm = load_reward_model(base)  # a seeded random scalar head is reward enough here
    rm.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    return {
        "root": root,
        "base": base,
        "rm": root / "rm",
        "demos": write_jsonl(root / "demos.jsonl", demo_rows(12)),
        "val": write_jsonl(root / "val.jsonl", demo_rows(16)[12:]),
        "ranks": write_jsonl(root / "ranks.jsonl", ranking_rows(24)),
        "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": f"name a color {i}"} for i in range(24)]),
        "val_prompts": write_jsonl(root / "val_prompts.jsonl", [{"prompt": f"say {w}"} for w in ("cat", "dog", "red")]),
        "ptx": write_jsonl(
            root / "ptx.jsonl",
            [{"text": "the cat sat on the mat ."}, {"text": "a dog ran far away . one two"}],
        ),
    }


def argv(stage: str, inp: dict, out: Path) -> list[str]:
    """Small runs: SFT 2 epochs × 3 steps, RM 6 steps, PPO 4 steps (with ptx and eval)."""
    common = ["--run.device=cpu", f"--out_dir={out}"]
    if stage == "sft":
        return [
            "sft",
            f"--base={inp['base']}",
            f"--data={inp['demos']}",
            f"--val_data={inp['val']}",
            "--epochs=2",
            "--batch_size=4",
            "--train.save_every=3",
            *common,
        ]
    if stage == "rm":
        return [
            "rm",
            f"--base={inp['base']}",
            f"--rankings={inp['ranks']}",
            f"--demos={inp['demos']}",
            "--batch_size=4",
            "--train.save_every=2",
            *common,
        ]
    return [
        "ppo",
        f"--policy={inp['base']}",
        f"--reward_model={inp['rm']}",
        f"--prompts={inp['prompts']}",
        f"--val_prompts={inp['val_prompts']}",
        f"--ptx_data={inp['ptx']}",
        "--ptx_per_episode=0.5",
        "--adaptive_kl=true",
        "--batch_size=8",
        "--minibatch_size=4",
        "--ppo_epochs=2",
        "--max_new_tokens=6",
        "--total_episodes=32",
        "--train.save_every=2",
        "--eval_every=2",
        "--train.lr=1e-3",
        "--warmup_steps=0",
        "--run.seed=1",
        *common,
    ]


MODEL_FILES = {
    "sft": ["model/model.safetensors"],
    "rm": ["model/model.safetensors"],
    "ppo": ["policy/model.safetensors", "value/model.safetensors"],
}
TRAIN_KEY = {"sft": "sft/loss", "rm": "rm/loss", "ppo": "objective/kl"}
STEPS = {"sft": 6, "rm": 6, "ppo": 4}


@pytest.fixture(scope="module")
def reference(driver, inputs):
    """Uninterrupted runs, one per stage, made on demand."""
    done: dict[str, Path] = {}

    def get(stage: str) -> Path:
        if stage not in done:
            out = inputs["root"] / f"ref-{stage}"
            status, log = driver.run(argv(stage, inputs, out))
            assert status == 0, log
            done[stage] = out
        return done[stage]

    return get


def _left_by_kill(out: Path, point: str) -> None:
    """The kill landed where it was aimed: what it leaves on disk proves it."""
    if point.startswith("swap:checkpoint"):
        # Between atomic_dir's renames: no checkpoint/, the previous one set aside.
        assert not (out / "checkpoint").exists()
        assert (out / ".checkpoint.old" / "state.json").is_file()
    elif point.startswith("swap:model"):
        assert not (out / "model").exists() and list(out.glob(".model.*.tmp"))
    elif point.startswith("checkpoint/partial"):
        staged = list(out.glob(".checkpoint.*.tmp"))
        assert staged and (staged[0] / "model.safetensors").is_file()
        assert not (staged[0] / "state.json").exists()
    else:  # metrics:<n>: n rows written, some of them past the last checkpoint
        rows = read_metrics(out / "metrics.jsonl")
        state = json.loads((out / "checkpoint" / "state.json").read_text())
        seen = state.get("metrics_rows", sum(r["step"] <= state["step"] for r in rows))
        assert len(rows) == int(point.rsplit(":", 1)[1]) and 0 < seen < len(rows)
    assert not (out / "summary.json").exists()


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


# Where each kill lands (row counts: SFT s1 s2 s3 e1 s4 s5 s6 e2; RM s1..s6 e1 final;
# PPO 0 1 2 3 4; checkpoints every 3 / 2 / 2 steps and at SFT/RM epoch ends):
CASES = [
    # SFT: after epoch 1's row, which shares step 3 with the checkpoint just saved.
    ("sft", "metrics:4"),
    # RM: mid-epoch, after step 5 (checkpoint at step 4).
    ("rm", "metrics:5"),
    # PPO: after step 3 (checkpoint at step 2).
    ("ppo", "metrics:4"),
    # SFT: its 3rd checkpoint (step 6) staged with weights only, nothing renamed yet.
    ("sft", "checkpoint/partial:3"),
    # PPO: its 2nd checkpoint (step 4) renamed in only halfway: no checkpoint/ at all.
    ("ppo", "swap:checkpoint:2"),
    # RM: while the finished model/ is renamed into place (after the final metrics row).
    ("rm", "swap:model:1"),
]


@pytest.mark.slow
@pytest.mark.parametrize("stage, point", CASES, ids=[f"{s}-{p}" for s, p in CASES])
def test_killed_run_resumes_to_the_uninterrupted_result(driver, inputs, reference, stage, point):
    ref = reference(stage)
    out = inputs["root"] / f"{stage}-{point.replace(':', '-').replace('/', '-')}"
    status, log = driver.run(argv(stage, inputs, out), {KILL_ENV: point})
    assert status == -signal.SIGKILL, log
    _left_by_kill(out, point)

    status, log = driver.run(argv(stage, inputs, out))  # the same command, nothing else
    assert status == 0, log
    for name in MODEL_FILES[stage]:
        a, b = load_file(str(ref / name)), load_file(str(out / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"
    rows, ref_rows = read_metrics(out / "metrics.jsonl"), read_metrics(ref / "metrics.jsonl")
    steps = [r["step"] for r in rows if TRAIN_KEY[stage] in r]
    assert steps == list(range(1, STEPS[stage] + 1))  # no gap, no step twice
    assert _untimed(rows) == _untimed(ref_rows)  # epoch and final rows once, too
    assert (out / "summary.json").is_file()
    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert not leftovers, f"temporary files left behind: {leftovers}"
    if stage == "ppo":
        assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 2


def test_a_resumed_metrics_log_drops_rows_past_the_checkpoint_and_a_torn_line(tmp_path):
    from rlhflab.io import MetricsLog

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1}, {"step": 2}, {"step": 2, "epoch": 1}, {"step": 3}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo'  # killed mid-write
    path.write_text(text)
    log = MetricsLog(path, truncate_after_step=2)  # a checkpoint that did not count rows
    assert read_metrics(path) == rows[:3] and log.rows == 3
    path.write_text(text)
    log = MetricsLog(path, keep_rows=2, truncate_after_step=2)  # counted: the epoch row goes
    log.log({"step": 3})
    assert read_metrics(path) == [*rows[:2], {"step": 3}] and log.rows == 3
    MetricsLog(path)  # a fresh run starts over
    assert not path.exists()
