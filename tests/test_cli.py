"""Every command the CLI lists exists and answers --help; overrides are `--key=value` or
`--key value`; unknown commands are refused."""

from __future__ import annotations

import importlib

import pytest

from rlhflab.cli import COMMANDS, main, overrides


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_listed_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert f"rlhflab {name}" in capsys.readouterr().out


def test_unknown_command_and_bad_override_form(capsys):
    assert main(["nope"]) == 2
    assert "unknown command" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["sft", "stray-argument"])
    assert e.value.code == 2


def test_overrides_take_both_spellings():
    assert overrides(["--a", "1", "--b=2", "--c.d", "x"]) == ["a=1", "b=2", "c.d=x"]
    assert overrides(["--no_eos_penalty", "-1.0", "--out=a=b", "--v="]) == [
        "no_eos_penalty=-1.0",
        "out=a=b",
        "v=",
    ]
    for bad in (["--lr"], ["--lr", "--epochs", "3"], ["lr=1"], ["--"]):
        with pytest.raises(ValueError):
            overrides(bad)


def _sft_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


def test_key_space_value_is_accepted_like_key_equals_value(tmp_path, capsys):
    base, data, out = tmp_path / "no-such-model", tmp_path / "no-such.jsonl", tmp_path / "out"
    spaced = _sft_error(
        [
            "sft",
            "--base",
            str(base),
            "--data",
            str(data),
            "--out_dir",
            str(out),
            "--train.lr",
            "0.001",
            "--run.seed",
            "3",
        ],
        capsys,
    )
    joined = _sft_error(
        ["sft", f"--base={base}", f"--data={data}", f"--out_dir={out}", "--train.lr=0.001", "--run.seed=3"],
        capsys,
    )
    assert spaced == joined and str(base) in spaced and spaced.startswith("error: ")
    # the value reaches the config: a bad one is refused the same way, naming the key
    spaced = _sft_error(["sft", "--base", str(base), "--data", str(data), "--epochs", "zero"], capsys)
    joined = _sft_error(["sft", f"--base={base}", f"--data={data}", "--epochs=zero"], capsys)
    assert spaced == joined and "epochs" in spaced and "zero" in spaced
    assert not out.exists()


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["sft", "--lr"], "--lr"),
        (["sft", "--base=x", "--train.lr"], "--train.lr"),
        (["ppo", "--kl_coef", "--ppo_epochs", "2"], "--kl_coef"),
    ],
)
def test_an_override_without_a_value_is_refused(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert f"{flag} needs a value" in capsys.readouterr().err


HELP_KEYS = {  # command -> (module, config class, a key its --help must list)
    "sft": ("rlhflab.stages.sft", "SFTConfig", "epochs"),
    "rm": ("rlhflab.stages.rm", "RMConfig", "epochs"),
    "ppo": ("rlhflab.stages.ppo.config", "PPOConfig", "kl_coef"),
    "pretrain": ("rlhflab.stages.pretrain", "PretrainConfig", "steps"),
    "eval": ("rlhflab.eval.evaluate", "EvalConfig", "baseline"),
    "sample": ("rlhflab.stages.sample", "SampleConfig", "k_min"),
    "run": ("rlhflab.pipeline", "RunConfig", "sweep_betas"),
}


@pytest.mark.parametrize("name", sorted(HELP_KEYS))
def test_help_lists_the_config_keys_with_defaults(name, capsys):
    module, cls, key = HELP_KEYS[name]
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    default = getattr(getattr(importlib.import_module(module), cls)(), key)
    assert f"\n  {key} = {default!r}\n" in out
    assert "--help-config" in out and "--key value" in out
    if name == "sft":
        assert "\n  epochs = 16\n" in out and "train.*" in out
