"""Stage 0: the base model learns the corpus, saves as a transformers model, resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhflab.cli import main
from rlhflab.config import load_config
from rlhflab.errors import InputError
from rlhflab.stages.pretrain import PretrainConfig, train
from rlhflab.world.build import build

from tiny import dotted


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("pw") / "world"
    build(out, seed=0, scale="small", vocab_size=400)
    return out


def _cfg(world, out, **kw):
    base = dict(
        world=str(world),
        out_dir=str(out),
        steps=80,
        batch_size=16,
        seq_len=64,
        eval_every=20,
        warmup_steps=5,
        save_every=40,
        gold_prompts=8,
    )
    base.update(kw)
    return load_config(PretrainConfig, overrides=[f"{dotted(k)}={v}" for k, v in base.items()])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_pretrain_beats_unigram_and_round_trips(world, tmp_path, precision):
    model_dir, s = train(_cfg(world, tmp_path / "pt", precision=precision))
    assert s["val_loss"] < s["unigram_loss"] - 1.0
    rows = [json.loads(x) for x in (tmp_path / "pt" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 81))
    assert rows[-1]["pretrain/loss"] < rows[0]["pretrain/loss"]
    assert 0.0 <= s["base_gold"] <= 1.0 and "base_style/Off-task" in s
    m = AutoModelForCausalLM.from_pretrained(model_dir)
    assert (model_dir / "model.safetensors").is_file() and m.config.n_positions == 64
    assert (tmp_path / "pt" / "config.yaml").is_file()


def test_resume_after_interruption_matches_uninterrupted(world, tmp_path):
    """Pretraining runs the one training loop: killed after its step-40 checkpoint it resumes
    bitwise, refuses to resume under another config, and leaves no checkpoint behind."""
    ref_dir, _ = train(_cfg(world, tmp_path / "a", gold_prompts=0))
    assert not (tmp_path / "a" / "checkpoint").exists()

    def die(step, row):
        if step == 50:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(world, tmp_path / "b", gold_prompts=0), callback=die)
    assert (tmp_path / "b" / "checkpoint").is_dir()
    with pytest.raises(InputError, match="train.lr"):
        train(_cfg(world, tmp_path / "b", gold_prompts=0, lr=1e-3))
    resumed_dir, _ = train(_cfg(world, tmp_path / "b", gold_prompts=0))
    a = AutoModelForCausalLM.from_pretrained(ref_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 81))
    assert not (tmp_path / "b" / "checkpoint").exists()


@pytest.mark.parametrize(
    "override, needle",
    [
        ("steps=abc", "steps"),
        ("stepz=3", "stepz"),
        ("size=huge", "size"),
        ("train.lr=-1", "train.lr"),
        ("train.precision=fp16", "train.precision"),
    ],
)
def test_bad_config_values_are_refused_in_one_line(world, tmp_path, capsys, override, needle):
    out = tmp_path / "o"
    assert main(["pretrain", f"--world={world}", f"--out_dir={out}", f"--{override}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "content, needle",
    [
        (b'{"text": "ok"}\n{"text": \n', ":2: not valid JSON"),
        (b'{"text": "ok"}\n{"txt": "x"}\n', ":2: field 'text': missing"),
        (b'{"text": 3}\n', ":1: field 'text': must be a string"),
        (b'{"text": "  "}\n', ":1: field 'text': must not be empty"),
        (b'{"text": "caf\xe9"}\n', ":1: not valid UTF-8"),
    ],
)
def test_bad_corpus_is_refused_naming_file_and_line(tmp_path, capsys, content, needle):
    bad = tmp_path / "corpus.jsonl"
    bad.write_bytes(content)
    out = tmp_path / "o"
    assert main(["pretrain", f"--corpus={bad}", f"--out_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and needle in err, err
    assert not out.exists()


def test_bad_yaml_config_names_file_and_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 3\nlr: [1,\n")
    assert main(["pretrain", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and "YAML" in err


def test_help_config_lists_documented_keys(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--help-config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "seq_len = 128" in out and "Tokens per window" in out
