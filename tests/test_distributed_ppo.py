"""PPO and `rlhflab sample` under torchrun: 2 processes on the CPU (gloo), DDP and FSDP2,
against the same run in one process.

The acceptance is numerical: the same global batch in 1 and 2 processes gives the same
metrics and weights, within float rounding (summation order differs: the gradients of two
half-minibatches averaged, statistics summed over ranks). Tolerances, set from measured
differences of ~1e-7 (weights) and ~1e-6 relative (metrics): metrics rel 1e-5 / abs 1e-6,
weights abs 1e-5. Sampling is bitwise the same (each chunk of the batch has its own seed,
stages/ppo/parallel.py), so a mismatch here is a real bug, not noise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhflab.distributed import DUMP_ENV, Dist
from rlhflab.errors import InputError
from rlhflab.io import read_metrics
from rlhflab.models import load_reward_model
from rlhflab.stages import sample
from rlhflab.stages.ppo import PPOConfig, parallel
from rlhflab.stages.ppo import loop as ppo_loop

from tiny import dotted, gpt2_dir, make, tiny_tokenizer, write_jsonl

TIMEOUT_S = 180
METRICS = dict(rel=1e-5, abs=1e-6)
WEIGHTS_ATOL = 1e-5
PPO = dict(
    batch_size=8,
    minibatch_size=4,
    rollout_chunk=2,  # 4 chunks: rank 0 samples chunks 0 and 2, rank 1 chunks 1 and 3
    ppo_epochs=2,
    max_new_tokens=6,
    ptx_per_episode=0.5,  # 2 texts per minibatch: 1 per rank
    eval_every=1,
    adaptive_kl=True,  # β moves with the global mean KL
    kl_horizon=100,
    lr=1e-3,
    warmup_steps=0,
    seed=1,
    save_every=1,
    device="cpu",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], env: dict | None = None) -> None:
    """`torchrun --nproc_per_node 2 -m rlhflab.cli ARGS` on one thread per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    env = dict(os.environ, OMP_NUM_THREADS="1", RLHFLAB_QUIET="1", RLHFLAB_DIST_TIMEOUT_S="60", **(env or {}))
    done = subprocess.run(
        [*cmd, "-m", "rlhflab.cli", *args], env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("dppo")
    policy = gpt2_dir(root / "policy", n_positions=64)
    torch.manual_seed(0)  # the RM's fresh scalar head
    rm = load_reward_model(policy)
    rm.save_pretrained(root / "rm")
    tiny_tokenizer().save_pretrained(root / "rm")
    # Prompts of different lengths: every rank pads to the longest of any rank's.
    prompts = [{"prompt": f"name a color {i}" + " red" * (i % 3)} for i in range(24)]
    texts = ["the cat sat on the mat .", "a dog ran far away . one two three", "yes no"]
    inputs = {
        "policy": str(policy),
        "reward_model": str(root / "rm"),
        "prompts": str(write_jsonl(root / "prompts.jsonl", prompts)),
        "ptx_data": str(write_jsonl(root / "ptx.jsonl", [{"text": t} for t in texts])),
        "val_prompts": str(write_jsonl(root / "val.jsonl", [{"prompt": f"say {w}"} for w in ("cat", "dog")])),
    }
    # The 1-process reference, one thread (as each torchrun process): 2 steps, a copy of
    # that directory (its checkpoint resumes under FSDP below), then on to 3 steps.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = root / "one"
        ppo_loop.train(config(inputs, one, steps=2))
        shutil.copytree(one, root / "one-at-2")
        ppo_loop.train(config(inputs, one, steps=3))
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "inputs": inputs, "one": one, "one_at_2": root / "one-at-2"}


def config(inputs: dict, out: Path, steps: int, **kw) -> PPOConfig:
    return make(PPOConfig, **inputs, **PPO, total_episodes=steps * PPO["batch_size"], out_dir=str(out), **kw)


def cli_args(inputs: dict, out: Path, steps: int, **kw) -> list[str]:
    keys = {**inputs, **PPO, "total_episodes": steps * PPO["batch_size"], "out_dir": str(out), **kw}
    return ["ppo", *(f"--{dotted(k)}={str(v).lower() if isinstance(v, bool) else v}" for k, v in keys.items())]


def assert_same_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        keys = {k for k in ra if not k.startswith("time/")}
        assert keys == {k for k in rb if not k.startswith("time/")}
        for k in sorted(keys):
            assert rb[k] == pytest.approx(ra[k], **METRICS), (ra["step"], k)


def assert_same_weights(a: Path, b: Path) -> None:
    for name in ("policy", "value"):
        wa, wb = load_file(str(a / name / "model.safetensors")), load_file(str(b / name / "model.safetensors"))
        assert wa.keys() == wb.keys(), name
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=WEIGHTS_ATOL, msg=f"{name} {k}")


def test_ddp_matches_one_process_and_its_checkpoint_resumes_on_one(lab, tmp_path):
    out, dump = tmp_path / "ddp", tmp_path / "dump"
    torchrun(cli_args(lab["inputs"], out, steps=2), env={DUMP_ENV: str(dump)})
    rows, ref = read_metrics(out / "metrics.jsonl"), read_metrics(lab["one_at_2"] / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]  # rank 0 alone wrote them
    assert_same_rows(ref, rows)  # RM score, KL, β, losses, eval: the same
    assert rows[2]["objective/kl_coef"] != 0.02 and rows[2]["ppo/loss/ptx"] > 0  # β moved; ptx trained
    assert_same_weights(lab["one_at_2"], out)
    assert json.loads((out / "summary.json").read_text())["processes"] == 2
    for step in (1, 2):  # DDP: every rank holds the same parameters after each step
        r0, r1 = (load_file(str(dump / f"step{step}" / f"rank{r}.safetensors")) for r in (0, 1))
        assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0), step

    # The 2-process checkpoint resumes in one process and ends where one process ends.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, summary = ppo_loop.train(config(lab["inputs"], out, steps=3))
    finally:
        torch.set_num_threads(threads)
    assert summary["resumed_from_step"] == 2 and summary["processes"] == 1
    assert_same_rows(read_metrics(lab["one"] / "metrics.jsonl"), read_metrics(out / "metrics.jsonl"))
    assert_same_weights(lab["one"], out)


def test_fsdp_matches_one_process(lab, tmp_path):
    out = tmp_path / "fsdp"
    torchrun(cli_args(lab["inputs"], out, steps=2, parallel="fsdp"))
    assert_same_rows(read_metrics(lab["one_at_2"] / "metrics.jsonl"), read_metrics(out / "metrics.jsonl"))
    assert_same_weights(lab["one_at_2"], out)  # gathered from the shards by rank 0


def test_a_one_process_checkpoint_resumes_on_two_under_fsdp(lab, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(lab["one_at_2"], out)
    torchrun(cli_args(lab["inputs"], out, steps=3, parallel="fsdp"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == 2 and summary["processes"] == 2
    assert_same_rows(read_metrics(lab["one"] / "metrics.jsonl"), read_metrics(out / "metrics.jsonl"))
    assert_same_weights(lab["one"], out)


def test_sample_under_torchrun_writes_the_one_process_file(lab, tmp_path):
    kw = dict(policy=lab["inputs"]["policy"], prompts=lab["inputs"]["prompts"], max_new_tokens=8)
    kw.update(batch_size=5, k_min=2, k_max=4)  # 24 prompts x K in chunks of 5: both ranks sample
    one, _ = sample.run(make(sample.SampleConfig, **kw, device="cpu", out=str(tmp_path / "one.jsonl")))
    two = tmp_path / "two.jsonl"
    args = [f"--{k}={v}" for k, v in kw.items()]
    torchrun(["sample", *args, "--run.device=cpu", f"--out={two}"])
    assert two.read_text() == one.read_text() and len(one.read_text().splitlines()) == 24


# --------------------------------------------------------------------------- no processes


def test_each_ranks_scaled_loss_averages_to_the_whole_minibatch_mean():
    tokens = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 2.0, 6.0, 2.0], dtype=torch.float64)
    per_token = torch.arange(8, dtype=torch.float64)  # each episode's loss per token
    owners = [torch.tensor([0, 1, 4, 5]), torch.tensor([2, 3, 6, 7])]  # chunks of 2, round robin
    minibatch = torch.tensor([6, 0, 1, 3])  # rank 0 holds 0 and 1, rank 1 holds 6 and 3
    whole = float((per_token[minibatch] * tokens[minibatch]).sum() / tokens[minibatch].sum())
    averaged = 0.0
    for r, rows in enumerate(owners):
        where = parallel.positions(rows, 8)
        local, scale = parallel.part(minibatch, where, tokens, Dist(rank=r, world_size=2))
        held = rows[local]
        mean = float((per_token[held] * tokens[held]).sum() / tokens[held].sum())  # the rank's token mean
        averaged += scale * mean / 2  # DDP averages the ranks' gradients
    assert averaged == pytest.approx(whole, rel=1e-12)
    # A rank holding none of a minibatch trains on a stand-in weighted 0.
    local, scale = parallel.part(torch.tensor([2, 3]), parallel.positions(owners[0], 8), tokens, Dist(0, 2))
    assert scale == 0.0 and local.tolist() == [0]


def test_what_two_processes_cannot_run_is_refused_before_any_model_loads():
    two = Dist(rank=0, world_size=2)
    base = make(PPOConfig, policy="p", reward_model="r", prompts="q", batch_size=8, minibatch_size=4)
    assert parallel.check_parallel(base, two) == "ddp"
    assert parallel.check_parallel(dataclasses.replace(base, ema_decay=0.9, lora_r=0), two) == "ddp"
    fsdp = dataclasses.replace(base, train=dataclasses.replace(base.train, parallel="fsdp"))
    for bad, field in (
        (dataclasses.replace(fsdp, ema_decay=0.9), "ema_decay"),
        (dataclasses.replace(fsdp, lora_r=4), "lora_r"),
        (dataclasses.replace(base, rollout_chunk=8), "rollout_chunk"),  # one chunk for two ranks
        (dataclasses.replace(base, batch_size=9, minibatch_size=3), "batch_size"),
    ):
        with pytest.raises(InputError) as e:
            parallel.check_parallel(bad, two)
        assert e.value.field == field
    assert parallel.check_parallel(fsdp, Dist()) == "none"  # one process ignores train.parallel


def test_bench_nproc_refuses_what_it_cannot_measure(capsys):
    from rlhflab import cli

    for args, says in (
        (["--nproc", "0"], "nproc"),
        (["--nproc", "2", "--vs", "trl"], "rlhflab alone"),
        (["--nproc", str((os.cpu_count() or 1) + 1)], "cores"),
    ):
        assert cli.main(["bench", "--workload", "tiny", *args]) == 2
        assert says in capsys.readouterr().err
