"""`rlhflab run --preset smoke`: every stage runs once, in order, and a finished stage is skipped."""

from __future__ import annotations

import json

import pytest

from rlhflab.cli import main

STAGES = [
    "world",
    "pretrain-small",
    "pretrain-large",
    "sft-small",
    "sft-large",
    "comparisons",
    "rm",
    "rm-eval",
    "ppo-small",
    "ppoptx-small",
    "sweep/beta-0",
    "eval",
]


@pytest.mark.slow
def test_smoke_run_then_rerun_skips_finished_stages(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--preset", "smoke", f"--out_dir={out}"]) == 0
    first = capsys.readouterr().out
    assert [s for s in STAGES if f"[run] {s}: finished" in first] == STAGES
    assert (out / "report.html").stat().st_size > 10_000
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert {
        "gold/SFT-small",
        "gold/PPO-ptx-small",
        "winrate/GPT-large",
        "capability/mean/PPO-small",
        "rl/ppo-small/final_kl",
        "rl/beta-0/peak_gold",
        "rl_fit/beta-0/gold/r2",
        "h2h/PPO-ptx-small/GPT-large",
        "h2h_ci_low/PPO-ptx-small/GPT-prompted-large",
    } <= set(summary)
    assert "PPO-ptx-small preferred to GPT-large:" in first
    row = next(x for x in first.splitlines() if x.strip().startswith("SFT-small "))
    assert row.split()[1:3] == [f"{summary['gold/SFT-small']:.3f}", f"{summary['gold_unseen/SFT-small']:.3f}"]
    rankings = (out / "comparisons" / "train.jsonl").read_text().splitlines()
    assert rankings and all(json.loads(r)["prompt"] for r in rankings)  # the RM's data: SFT samples
    assert "rm/spearman_gold_within_prompt" in json.loads((out / "rm-eval" / "summary.json").read_text())
    walk = json.loads((out / "walkthrough.json").read_text())
    step = walk["ppo_step"]
    assert abs(step["reward"] - (step["rm_score"] - step["kl_coef"] * step["kl"])) < 1e-3
    assert len(walk["ranking"]["rm_scores"]) == len(walk["ranking"]["responses"]) >= 4
    assert "Not shown" not in (out / "report.html").read_text().split("Walkthrough", 2)[-1].split("<h2", 1)[0]
    for stage in ("sft-small", "rm", "ppo-small", "sweep/beta-0"):
        assert (out / stage / "config.yaml").is_file() and (out / stage / "metrics.jsonl").is_file()

    # Again: nothing is redone, so nothing changes.
    before = (out / "rm" / "model" / "model.safetensors").read_bytes()
    (out / "eval" / "summary.json").unlink()  # only the evaluation is unfinished now
    assert main(["run", "--preset", "smoke", f"--out_dir={out}"]) == 0
    second = capsys.readouterr().out
    assert all(f"[run] {s}: done already, skipped" in second for s in STAGES[:-1])
    assert "[run] eval: finished" in second
    assert (out / "rm" / "model" / "model.safetensors").read_bytes() == before
    assert json.loads((out / "eval" / "summary.json").read_text()) == summary  # evaluation is deterministic


def test_bad_override_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--preset", "smoke", f"--out_dir={out}", "--ppo.kl_coef=-1"]) == 2
    assert "ppo.kl_coef" in capsys.readouterr().err
    assert not out.exists()


def test_a_stage_error_in_its_own_process_reaches_the_caller_whole(tmp_path):
    """Stages run in spawned processes; a bad input there is still one error naming file and line."""
    from rlhflab.data import read_prompts
    from rlhflab.errors import InputError
    from rlhflab.pipeline import Pipeline, RunConfig

    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    pipe = Pipeline(RunConfig(out_dir=str(tmp_path / "run")))
    assert pipe.cfg.isolate_stages
    with pytest.raises(InputError) as err:
        pipe.stage("bad", read_prompts, bad)
    assert (err.value.file, err.value.line, err.value.field) == (str(bad), 2, "prompt")
