"""`rlhflab run --preset smoke`: every stage runs once, in order, and a finished stage is skipped."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rlhflab.cli import main
from rlhflab.errors import InputError

STAGES = [
    "world",
    "pretrain-small",
    "pretrain-large",
    "sft-small",
    "sft-large",
    "comparisons",
    "rm",
    "rm-eval",
    "rlinit-small",
    "rlinit-large",
    "ppo-small",
    "ppoptx-small",
    "ppo-large",
    "ppoptx-large",
    "sweep/beta-0",
    "sweep/ptx-beta-0",
    *[f"answers/{m}-{s}" for s in ("small", "large") for m in ("GPT", "SFT", "PPO", "PPO-ptx")],
    "answers/PPO-beta0-small",
    "answers/RL-init-small",  # capability only
    "eval",
]


# figure1's additions: PPO at both sizes, the RM's comparisons from both SFT models
# and PPO from App. C.3's model (rl_init=c3)
SMOKE = ["run", "--preset", "smoke", "--rlhf_sizes=[small, large]", "--comparisons_from=[small, large]", "--rl_init=c3"]


@pytest.mark.slow
def test_smoke_run_then_rerun_skips_finished_stages(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*SMOKE, f"--out_dir={out}"]) == 0
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
        "h2h/PPO-ptx-large/SFT-large",
        "figure1/large/PPO-ptx/win_vs_sft_large",
        "tax_delta/PPO-large/webtext",
        "rl/ppoptx-large/final_kl",
        "rl/ptx-beta-0/final_kl",  # the PPO-ptx sweep (smoke: β = 0), its models judged head to head
        "h2h/PPO-ptx-beta0-small/SFT-small",
        "h2h/PPO-beta0-small/SFT-small",
        "tax_delta/PPO-ptx-beta0-small/webtext",
    } <= set(summary)
    assert "PPO-ptx-small preferred to GPT-large:" in first
    assert "PPO-large preferred to SFT-large:" in first
    row = next(x for x in first.splitlines() if x.strip().startswith("SFT-small "))
    assert row.split()[1:3] == [f"{summary['gold/SFT-small']:.3f}", f"{summary['gold_unseen/SFT-small']:.3f}"]
    assert json.loads((out / "comparisons" / "summary.json").read_text())["train_policies"] == [
        str(out / "sft-small" / "model"),
        str(out / "sft-large" / "model"),
    ]
    rankings = (out / "comparisons" / "train.jsonl").read_text().splitlines()
    assert rankings and all(json.loads(r)["prompt"] for r in rankings)  # the RM's data: SFT samples
    assert "rm/spearman_gold_within_prompt" in json.loads((out / "rm-eval" / "summary.json").read_text())
    walk = json.loads((out / "walkthrough.json").read_text())
    step = walk["ppo_step"]
    assert abs(step["reward"] - (step["rm_score"] - step["kl_coef"] * step["kl"])) < 1e-3
    assert len(walk["ranking"]["rm_scores"]) == len(walk["ranking"]["responses"]) >= 4
    assert "Not shown" not in (out / "report.html").read_text().split("Walkthrough", 2)[-1].split("<h2", 1)[0]
    for stage in ("sft-small", "rm", "rlinit-small", "ppo-small", "sweep/beta-0"):
        assert (out / stage / "config.yaml").is_file() and (out / stage / "metrics.jsonl").is_file()
    # PPO starts from App. C.3's model: demonstrations with pretraining text, its epoch the RM's choice
    init = json.loads((out / "rlinit-small" / "summary.json").read_text())
    assert init["selected_by"] == "reward_model" and init["ptx_texts"] > 0 and len(init["epochs"]) == 2
    assert all("val_score" in e for e in init["epochs"])
    assert init["best_epoch"] == max(init["epochs"], key=lambda e: e["val_score"])["epoch"]
    import yaml

    assert yaml.safe_load((out / "ppo-small" / "config.yaml").read_text())["policy"] == str(
        out / "rlinit-small" / "model"
    )
    assert "tax_delta/RL-init-small/mean" in summary and "winrate/RL-init-small" not in summary

    # Again: nothing finished is redone, so nothing changes (the eval's own determinism is
    # test_evaluate's; the RM report is the cheapest stage to redo).
    before = (out / "rm" / "model" / "model.safetensors").read_bytes()
    report = (out / "rm-eval" / "summary.json").read_text()
    (out / "rm-eval" / "summary.json").unlink()  # only the RM report is unfinished now
    assert main([*SMOKE, f"--out_dir={out}"]) == 0
    second = capsys.readouterr().out
    assert all(f"[run] {s}: done already, skipped" in second for s in STAGES if s != "rm-eval")
    assert "[run] rm-eval: finished" in second
    assert (out / "rm" / "model" / "model.safetensors").read_bytes() == before
    assert (out / "rm-eval" / "summary.json").read_text() == report
    assert json.loads((out / "eval" / "summary.json").read_text()) == summary


def test_figure1_preset_runs_ppo_and_ppo_ptx_from_sft_large_too(tmp_path):
    """The default runs RLHF at the small size; `figure1` adds both PPO runs from SFT-large,
    judged against SFT-large head to head, with the one reward model, trained on rankings of
    both SFT models' samples."""
    from rlhflab.config import load_config
    from rlhflab.pipeline import Pipeline, RunConfig, _base, head_to_head

    def graph(preset: str, *overrides: str):
        cfg = load_config(RunConfig, overrides=[f"out_dir={tmp_path}", *overrides], base=_base(preset))
        pipe = Pipeline(cfg)
        return pipe, {j.name: j for j in pipe.jobs()}

    pipe, jobs = graph("default")
    assert pipe.cfg.rlhf_sizes == ["small"] and not {"ppo-large", "ppoptx-large", "rlinit-small"} & set(jobs)
    assert jobs["ppo-small"].needs == ("rm", "sft-small")
    assert jobs["ppo-small"].make()[1][0].policy == str(tmp_path / "sft-small" / "model")
    assert jobs["comparisons"].needs == ("sft-small",)
    assert "PPO-large" not in pipe.models() and ("PPO-ptx-large", "SFT-large") not in head_to_head(["small"])
    # the β sweeps: PPO-ptx at the paper's β beside PPO at it, both evaluated in full; PPO at β = 0 for capability
    assert jobs["sweep/ptx-beta-0.02"].needs == ("rm", "sft-small")
    _train, (ptx,) = jobs["sweep/ptx-beta-0.02"].make()
    assert ptx.kl_coef == 0.02 and ptx.ptx_data is not None and ptx.ptx_coef == pipe.cfg.ppo_ptx.ptx_coef
    assert jobs["sweep/beta-0.02"].make()[1][0].ptx_data is None
    models = pipe.models()
    assert {"PPO-ptx-beta0.02-small", "PPO-beta0.02-small"} <= set(models) and "PPO-beta0-small" not in models
    assert "sweep/ptx-beta-0.02" in jobs["eval"].needs and pipe._sweep_models(full=False) == {
        "PPO-beta0-small": "sweep/beta-0"
    }
    assert {("PPO-ptx-beta0.02-small", "SFT-small"), ("PPO-beta0.02-small", "SFT-small")} <= set(pipe.head_to_head())
    pipe, jobs = graph("figure1", "rl_init=c3")
    for name in ("ppo-large", "ppoptx-large"):
        assert jobs[name].needs == ("rm", "rlinit-large") and name in jobs["eval"].needs
        _train, (cfg,) = jobs[name].make()
        start = str(tmp_path / "rlinit-large" / "model")
        assert (cfg.policy, cfg.reward_model) == (start, str(tmp_path / "rm" / "model"))
        assert (cfg.ptx_data is not None) == (name == "ppoptx-large")
    assert jobs["ppo-small"].needs == ("rm", "rlinit-small") and jobs["sweep/beta-0"].needs == ("rm", "rlinit-small")
    assert jobs["rlinit-large"].needs == ("pretrain-large", "rm")
    _train, (init,) = jobs["rlinit-large"].make()
    assert (init.base, init.epochs, init.ptx_fraction) == (str(tmp_path / "pretrain-large" / "model"), 2, 0.1)
    assert init.reward_model == str(tmp_path / "rm" / "model") and init.ptx_data.endswith("corpus_train.jsonl")
    assert init.train.lr == pipe.cfg.sft_large.train.lr  # the size's SFT recipe, shorter and with the mix
    assert jobs["comparisons"].needs == ("sft-small", "sft-large")  # the RM ranks both SFT models' samples
    assert pipe.models()["PPO-ptx-large"] == tmp_path / "ppoptx-large" / "policy"
    pairs = head_to_head(pipe.cfg.rlhf_sizes)
    assert {("PPO-large", "SFT-large"), ("PPO-ptx-large", "SFT-large"), ("PPO-ptx-small", "SFT-small")} <= set(pairs)


def test_quick_preset_halves_the_critical_path_and_keeps_the_rest_of_the_recipe(tmp_path):
    """`quick`: the large model's pretraining and SFT, the RM and PPO at half the default's
    steps, SFT still a tenth of pretraining, the β sweep at β = 0 only; the rest is the
    default's (β, γ, the small model, the eval)."""
    from rlhflab.config import load_config
    from rlhflab.pipeline import Pipeline, RunConfig, _base

    def cfg(preset: str) -> RunConfig:
        return load_config(RunConfig, overrides=[f"out_dir={tmp_path}"], base=_base(preset))

    quick, default = cfg("quick"), cfg("default")
    ratio = {
        name: (c.pretrain_large.steps, c.sft_large.epochs, c.rm.epochs, c.ppo.total_episodes, c.ppo_ptx.total_episodes)
        for name, c in (("quick", quick), ("default", default))
    }
    assert [d / q for q, d in zip(ratio["quick"], ratio["default"])] == [2, 2, 2, 2, 2]
    assert (quick.ppo.kl_coef, quick.ppo_ptx.kl_coef, quick.ppo_ptx.ptx_coef) == (
        default.ppo.kl_coef,
        default.ppo_ptx.kl_coef,
        default.ppo_ptx.ptx_coef,
    )
    assert quick.pretrain_small == default.pretrain_small and quick.sft_small == default.sft_small
    assert quick.eval == default.eval and quick.sft_large.train.lr == default.sft_large.train.lr
    assert quick.ppo.eval_every * 2 == default.ppo.eval_every  # the β = 0 gold curve keeps its points
    jobs = {j.name for j in Pipeline(quick).jobs()}
    assert "sweep/beta-0" in jobs and not {"sweep/beta-0.02", "sweep/ptx-beta-0.02"} & jobs


@pytest.mark.parametrize("key", ["rlhf_sizes", "comparisons_from"])
@pytest.mark.parametrize("sizes", ["[large]", "[small, small]"])
def test_sizes_without_the_small_model_or_twice_are_refused(tmp_path, capsys, sizes, key):
    out = tmp_path / "run"
    assert main(["run", "--preset", "smoke", f"--out_dir={out}", f"--{key}={sizes}"]) == 2
    assert key in capsys.readouterr().err
    assert not out.exists()


def test_comparisons_from_both_sft_models_waits_for_both(tmp_path):
    from rlhflab.config import load_config
    from rlhflab.pipeline import Pipeline, RunConfig, _base

    def comparisons(*overrides):
        cfg = load_config(RunConfig, overrides=[f"out_dir={tmp_path}", *overrides], base=_base("default"))
        return next(j for j in Pipeline(cfg).jobs() if j.name == "comparisons")

    assert comparisons().needs == ("sft-small",) and comparisons().make()[1][5] == ()
    both = comparisons("comparisons_from=[small, large]")
    assert both.needs == ("sft-small", "sft-large")
    _build, args = both.make()
    assert args[1] == tmp_path / "sft-small" / "model" and args[5] == (tmp_path / "sft-large" / "model",)


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


def _stage(out_dir: str, seconds: float, fail: bool = False) -> None:
    """A stand-in stage: sleeps, then records when it ran and with how many threads."""
    import time
    from pathlib import Path

    import torch

    from rlhflab.errors import InputError

    t0 = time.time()
    time.sleep(seconds)
    if fail:
        raise InputError("bad row", file="x.jsonl", line=3, field="prompt")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    row = {"start": t0, "end": time.time(), "threads": torch.get_num_threads()}
    (Path(out_dir) / "summary.json").write_text(json.dumps(row))


def _jobs(root, seconds: dict, fail: str = ""):
    from rlhflab.pipeline import Job

    def job(name, *needs):
        args = (str(root / name), seconds.get(name, 0.5), name == fail)
        return Job(name, lambda: (_stage, args), needs)

    return [job("a"), job("b", "a"), job("c", "a"), job("d", "b", "c")]


def test_independent_stages_run_side_by_side_and_the_rest_wait(tmp_path, capsys):
    """a -> (b, c) -> d at two lanes: b and c overlap, each with cores // 2 threads and its
    output in logs/; a and d (every other stage is before or after them) get every core."""
    import torch

    from rlhflab.pipeline import Pipeline, RunConfig
    from rlhflab.training import cpu_cores

    pipe = Pipeline(RunConfig(out_dir=str(tmp_path)))
    pipe.schedule(_jobs(tmp_path, {"b": 3.0, "c": 3.0}), lanes=2)
    rows = {n: json.loads((tmp_path / n / "summary.json").read_text()) for n in "abcd"}
    assert rows["b"]["start"] < rows["c"]["end"] and rows["c"]["start"] < rows["b"]["end"]
    assert rows["b"]["start"] >= rows["a"]["end"] and rows["c"]["start"] >= rows["a"]["end"]
    assert rows["d"]["start"] >= max(rows["b"]["end"], rows["c"]["end"])
    assert rows["b"]["threads"] == rows["c"]["threads"] == max(1, cpu_cores() // 2)
    assert rows["a"]["threads"] == rows["d"]["threads"] == torch.get_num_threads()
    assert (tmp_path / "logs" / "b.log").is_file() and not (tmp_path / "logs" / "a.log").exists()
    out = capsys.readouterr().out
    assert all(f"[run] {n}: finished" in out for n in "abcd")

    # One lane: the same stages one after another, none beside another.
    for n in "abcd":
        (tmp_path / n / "summary.json").unlink()
    pipe.schedule(_jobs(tmp_path, {}), lanes=1)
    rows = [json.loads((tmp_path / n / "summary.json").read_text()) for n in "abcd"]
    assert all(x["end"] <= y["start"] for x, y in zip(rows, rows[1:]))


def test_a_failing_stage_stops_the_one_beside_it_and_its_error_reaches_the_caller(tmp_path):
    import time

    from rlhflab.errors import InputError
    from rlhflab.pipeline import Pipeline, RunConfig

    pipe = Pipeline(RunConfig(out_dir=str(tmp_path)))
    t0 = time.time()
    with pytest.raises(InputError) as err:
        pipe.schedule(_jobs(tmp_path, {"b": 1.0, "c": 60.0}, fail="b"), lanes=2)
    assert (err.value.file, err.value.line, err.value.field) == ("x.jsonl", 3, "prompt")
    assert time.time() - t0 < 40  # c was stopped, not waited for
    assert (tmp_path / "a" / "summary.json").is_file()
    assert not (tmp_path / "c" / "summary.json").exists() and not (tmp_path / "d").exists()


def _threads_and_square(x: int) -> tuple[int, int]:
    import torch

    if x < 0:
        raise ValueError(f"negative: {x}")
    return torch.get_num_threads(), x * x


def test_side_by_side_keeps_call_order_threads_and_errors():
    from rlhflab.training import cpu_cores, side_by_side

    out = side_by_side(_threads_and_square, [(i,) for i in range(5)], jobs=2)
    assert [sq for _, sq in out] == [0, 1, 4, 9, 16]
    assert {th for th, _ in out} == {max(1, cpu_cores() // 2)}
    threads = torch.get_num_threads()
    # One call runs here, at the threads it would have had beside the others.
    assert side_by_side(_threads_and_square, [(3,)], jobs=2) == [(max(1, cpu_cores() // 2), 9)]
    assert torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="negative: -1"):
        side_by_side(_threads_and_square, [(2,), (-1,)], jobs=2)


def _env_and_modules(name: str) -> tuple[str | None, bool]:
    import sys

    return os.environ.get(name), "transformers" in sys.modules


def test_stage_processes_start_with_the_callers_environment_and_torch_loaded(monkeypatch):
    """They fork from a server started once (training.stage_context): the environment is the
    caller's at each call, not the server's, and torch and transformers are imported already."""
    from rlhflab.training import side_by_side

    side_by_side(_env_and_modules, [("RLHFLAB_TEST_ENV",)] * 2, jobs=2)  # the server is up now
    for value in ("one", "two"):
        monkeypatch.setenv("RLHFLAB_TEST_ENV", value)
        assert side_by_side(_env_and_modules, [("RLHFLAB_TEST_ENV",)] * 2, jobs=2) == [(value, True)] * 2
    monkeypatch.delenv("RLHFLAB_TEST_ENV")
    assert side_by_side(_env_and_modules, [("RLHFLAB_TEST_ENV",)] * 2, jobs=2) == [(None, True)] * 2


def test_a_finished_world_of_another_version_is_refused_before_any_stage(tmp_path):
    from rlhflab.pipeline import Pipeline, RunConfig
    from rlhflab.world import VERSION

    world = tmp_path / "world"
    world.mkdir()
    (world / "world.json").write_text(json.dumps({"seed": 0, "scale": "small", "version": VERSION - 1}))
    (world / "summary.json").write_text("{}")
    with pytest.raises(InputError, match="a new --out_dir"):
        Pipeline(RunConfig(out_dir=str(tmp_path), precision="fp32")).run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]  # nothing started, nothing written


def test_a_run_directory_of_another_config_is_refused_by_key_and_kept(tmp_path, capsys):
    """`--preset figure1` into the directory of a default run would reuse its RM and eval."""
    from rlhflab.config import load_config, save_config
    from rlhflab.pipeline import Pipeline, RunConfig, _base

    def cfg(out, preset="figure1", *more):
        return load_config(RunConfig, overrides=[f"out_dir={out}", "precision=fp32", *more], base=_base(preset))

    save_config(cfg(tmp_path), tmp_path / "config.yaml")
    before = (tmp_path / "config.yaml").read_text()
    assert main(["run", f"--out_dir={tmp_path}", "--precision=fp32"]) == 2  # the default preset
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.yaml" in err[0] and "comparisons_from=['small', 'large']" in err[0], err
    assert (tmp_path / "config.yaml").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # nothing started
    # The same run, where only what moves no stage's output differs, may resume.
    Pipeline(cfg(tmp_path, "figure1", "jobs=1", "isolate_stages=false"))._check_resumable()
    with pytest.raises(InputError, match="ppo.kl_coef"):
        Pipeline(cfg(tmp_path, "figure1", "ppo.kl_coef=0.3"))._check_resumable()


@pytest.mark.parametrize("preset", ["default", "smoke"])
def test_help_config_shows_the_values_the_preset_runs_with(preset, capsys):
    from rlhflab.pipeline.config import PRESETS

    with pytest.raises(SystemExit):
        main(["run", "--help-config", "--preset", preset])
    out = capsys.readouterr().out
    steps = PRESETS[preset]["pretrain_small"]["steps"]
    assert f"  pretrain_small.steps = {steps!r}\n" in out
    assert f"  sft_small.epochs = {PRESETS[preset]['sft_small']['epochs']!r}\n" in out
    if preset == "default":  # the lab's SFT lr (pipeline.LAB_SFT), not SFTConfig's default
        assert f"  sft_small.train.lr = {PRESETS[preset]['sft_small']['train']['lr']!r}\n" in out
        assert "  rm.epochs = 2\n" in out and "  rm.train.lr = 0.0003\n" in out  # pipeline.LAB_RM
