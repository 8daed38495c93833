"""More than one process: `torchrun --nproc_per_node 2 -m rlhflab sft|rm` on the CPU
(gloo) takes the 1-process steps on the same global batch, under DDP and FSDP2; a rank
killed mid-run ends the job, named, and the same command resumes it; a checkpoint written
by 2 processes resumes on 1 and the reverse; a rank that hangs fails the others in time.

Each torchrun job is two fresh processes (imports: ~8 s on 2 cores); the 1-process
references run in this process. Tolerances (fp32, measured on a 2-core Zen 2: losses
≤ 2e-7 relative, weights ≤ 4e-6 absolute after 4-6 Adam steps): LOSS_REL and WEIGHT_ABS.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhflab.distributed import DUMP_ENV
from rlhflab.io import KILL_ENV, read_metrics
from rlhflab.stages import rm, sft

from tiny import demo_rows, dotted, gpt2_dir, llama_dir, make, ranking_rows, tiny_tokenizer, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 120
LOSS_REL = 1e-5
"""Relative gap allowed between a 2-process and the 1-process loss (or metric) of a step."""
WEIGHT_ABS = 2e-5
"""Absolute gap allowed in final weights: 2% of one Adam step at lr 1e-3."""

SFT = dict(epochs=2, batch_size=5, dropout=0.0, save_every=2, eval_batch_size=1, lr=1e-3)
"""11 demonstrations in batches of 5: steps of 5, 5 and 1 (one rank gets none: it runs a
stand-in weighted 0); val loss by single examples, so the ranks share its batches."""
RM = dict(epochs=2, batch_size=4, micro_batch_size=1, save_every=2, eval_batch_size=2)
"""7 prompts of 3 or 4 responses in batches of 4, one prompt per forward: the ranks hold
different numbers of micro-batches and of pairs."""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    tok = tiny_tokenizer()
    rankings = ranking_rows(7, 4)
    rankings[1] = {"prompt": "name a color x", "responses": ["red", "red red", "red red red"], "ranking": [2, 1, 0]}
    return {
        "dir": d,
        "gpt2": gpt2_dir(d / "gpt2", tok, n_positions=64),
        "llama": llama_dir(d / "llama", tok, max_positions=64),
        "demos": write_jsonl(d / "demos.jsonl", demo_rows(11)),
        "val": write_jsonl(d / "val.jsonl", demo_rows(16)[12:]),
        "ranks": write_jsonl(d / "ranks.jsonl", rankings),
        "val_ranks": write_jsonl(d / "val_ranks.jsonl", ranking_rows(3, 3)),
    }


def inputs(lab, stage: str, base: str) -> dict:
    if stage == "sft":
        return dict(SFT, base=str(lab[base]), data=str(lab["demos"]), val_data=str(lab["val"]))
    return dict(RM, base=str(lab[base]), rankings=str(lab["ranks"]), val_rankings=str(lab["val_ranks"]),
                demos=str(lab["demos"]))  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    cmd += ["--max-restarts=0", *args]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "RLHFLAB_QUIET": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONFAULTHANDLER": "1",
        **(env or {}),
    }
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def run2(stage: str, kw: dict, out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`rlhflab <stage>` on two processes."""
    flags = [f"--{dotted(k)}={v}" for k, v in {**kw, "device": "cpu", "out_dir": out}.items()]
    return torchrun(["-m", "rlhflab", stage, *flags], env)


def run1(stage: str, kw: dict, out: Path, callback=None) -> Path:
    """`rlhflab <stage>` in this process (one thread, like each rank)."""
    module = sft if stage == "sft" else rm
    cls = sft.SFTConfig if stage == "sft" else rm.RMConfig
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module.train(make(cls, out_dir=str(out), device="cpu", **kw), callback=callback)
    finally:
        torch.set_num_threads(n)
    return out


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def assert_same_run(a: Path, b: Path, exact: bool = False) -> None:
    """The same metrics rows (steps, keys; values to LOSS_REL) and weights (to WEIGHT_ABS)."""
    ra, rb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [sorted(r) for r in ra] == [sorted(r) for r in rb] and [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for k, v in x.items():
            assert v == y[k] if exact else v == pytest.approx(y[k], rel=LOSS_REL, abs=1e-9), (k, x["step"], v, y[k])
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]) if exact else torch.allclose(wa[k], wb[k], rtol=0, atol=WEIGHT_ABS), k


@pytest.fixture(scope="module")
def runs(lab):
    """Uninterrupted runs, made once each on demand: (stage, base, parallel or '1')."""
    done: dict[tuple, Path] = {}

    def get(stage: str, base: str, parallel: str) -> Path:
        key = (stage, base, parallel)
        if key not in done:
            out = lab["dir"] / "-".join(key)
            kw = inputs(lab, stage, base)
            if parallel == "1":
                run1(stage, kw, out)
            else:
                job = run2(stage, {**kw, "parallel": parallel}, out, {DUMP_ENV: str(out / "dump")})
                assert job.returncode == 0, job.stderr[-8000:]
                assert job.stdout.count(f"{stage}: wrote") == 1  # rank 0 alone reports
            done[key] = out
        return done[key]

    return get


# --------------------------------------------------------------------------- the same steps


def test_sft_under_ddp_takes_the_one_process_steps_and_the_ranks_stay_equal(runs):
    ddp, one = runs("sft", "gpt2", "ddp"), runs("sft", "gpt2", "1")
    assert_same_run(ddp, one)  # every step's loss, each epoch's val loss: one row each
    s2, s1 = (json.loads((d / "summary.json").read_text()) for d in (ddp, one))
    assert s2["best_epoch"] == s1["best_epoch"] and s2["steps"] == s1["steps"] == 6
    r0, r1 = (load_file(str(ddp / "dump" / f"rank{r}.safetensors")) for r in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)  # replicas in sync
    saved = weights(ddp)
    assert all(torch.equal(saved[k], r0[k]) for k in saved)


def test_sft_under_fsdp_matches_one_process_and_its_shards_make_the_saved_model(runs):
    fsdp, one = runs("sft", "llama", "fsdp"), runs("sft", "llama", "1")
    assert_same_run(fsdp, one)
    r0, r1 = (load_file(str(fsdp / "dump" / f"rank{r}.safetensors")) for r in (0, 1))
    saved = weights(fsdp)
    assert saved.keys() == r0.keys()
    for k in saved:  # each rank holds rows of every weight; together, the gathered model
        assert r0[k].numel() < saved[k].numel()
        assert torch.equal(torch.cat([r0[k], r1[k]]), saved[k]), k


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_rm_takes_the_one_process_steps(runs, parallel):
    two, one = runs("rm", "gpt2", parallel), runs("rm", "gpt2", "1")
    assert_same_run(two, one)  # accuracy over pairs, val loss, the demo-centring bias
    s2, s1 = (json.loads((d / "summary.json").read_text()) for d in (two, one))
    assert s2["bias"] == pytest.approx(s1["bias"], rel=LOSS_REL) and s2["rm/train_accuracy"] == s1["rm/train_accuracy"]


# --------------------------------------------------------------------------- failures and resumes


def test_a_killed_rank_ends_the_job_naming_it_and_the_rerun_resumes(lab, runs):
    ref, one = runs("sft", "llama", "fsdp"), runs("sft", "llama", "1")
    kw, out = {**inputs(lab, "sft", "llama"), "parallel": "fsdp"}, lab["dir"] / "killed"
    t0 = time.monotonic()
    job = run2("sft", kw, out, {KILL_ENV: "step/rank1:3"})  # SIGKILL rank 1 after step 3
    assert job.returncode != 0 and time.monotonic() - t0 < TIMEOUT_S
    cause = job.stderr.rpartition("Root Cause")[2]  # torchrun's failure summary ends the output
    assert "rank      : 1 (local_rank: 1)" in cause and "SIGKILL" in cause, job.stderr[-2000:]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and state["world_size"] == 2 and not (out / "summary.json").exists()
    shutil.copytree(out, lab["dir"] / "killed-copy")

    job = run2("sft", kw, out)  # the same command again
    assert job.returncode == 0, job.stderr[-8000:]
    assert_same_run(out, ref, exact=True)  # every row once, the very same weights

    # The 2-process checkpoint resumes on one process (DCP reshards to whole tensors).
    shutil.rmtree(out)
    shutil.move(lab["dir"] / "killed-copy", out)
    run1("sft", kw, out)
    assert_same_run(out, one)
    assert_same_run(out, ref)


class Stopped(Exception):
    """Raised from a step callback: the run stops as a kill would, its checkpoint kept."""


def test_a_one_process_checkpoint_resumes_on_two(lab, runs):
    ref, one = runs("sft", "gpt2", "ddp"), runs("sft", "gpt2", "1")
    kw, out = inputs(lab, "sft", "gpt2"), lab["dir"] / "one-then-two"

    def stop(step, row):
        if step == 3:
            raise Stopped

    with pytest.raises(Stopped):
        run1("sft", kw, out, callback=stop)
    assert (out / "checkpoint" / "model.safetensors").is_file()  # the 1-process form, at step 2
    job = run2("sft", {**kw, "parallel": "ddp"}, out)
    assert job.returncode == 0, job.stderr[-8000:]
    assert_same_run(out, ref)
    assert_same_run(out, one)


HANG = """
import sys, time, torch
from rlhflab import distributed
dist = distributed.setup(torch.device("cpu"), timeout_s=2)
if dist.rank == 1:
    time.sleep(60)  # alive, but never joins the all-reduce
t0 = time.monotonic()
try:
    dist.sum(1.0)
except RuntimeError:
    print(f"timed out after {time.monotonic() - t0:.1f} s", flush=True)
    sys.exit(1)
"""


def test_a_rank_that_hangs_fails_the_others_within_the_timeout(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    t0 = time.monotonic()
    job = torchrun([str(script)])
    assert job.returncode != 0 and time.monotonic() - t0 < 30  # not rank 1's 60 s sleep
    waited = float(job.stdout.split("timed out after ")[1].split()[0])
    assert 1.5 <= waited < 10, job.stdout
