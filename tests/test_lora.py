"""LoRA PPO (lora_r > 0, through peft): adapters train over a frozen base that the reference
shares (no copy), the first step is π_SFT's, outputs load with and without peft, resume is exact."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhflab import adapters, cli
from rlhflab.bench import main as bench
from rlhflab.config import validate
from rlhflab.errors import ConfigError, InputError
from rlhflab.io import KILL_ENV, read_metrics
from rlhflab.models import load_causal_lm, load_reward_model, position_ids
from rlhflab.stages.ppo import PPOConfig
from rlhflab.stages.ppo import loop as ppo_loop

from tiny import gpt2_dir, llama_dir, make, tiny_tokenizer, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: a second thread only spins


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    tok = tiny_tokenizer()
    out = {"root": root}
    for name, build in (("gpt2", gpt2_dir), ("llama", llama_dir)):
        policy = build(root / name, tok, 64)
        torch.manual_seed(0)
        load_reward_model(policy).save_pretrained(root / f"{name}-rm")  # a seeded random head
        tok.save_pretrained(root / f"{name}-rm")
        out[name], out[f"{name}-rm"] = policy, root / f"{name}-rm"
    out["prompts"] = write_jsonl(root / "prompts.jsonl", [{"prompt": f"name a color {i}"} for i in range(24)])
    out["val"] = write_jsonl(root / "val.jsonl", [{"prompt": f"say {w}"} for w in ("cat", "dog", "red")])
    out["ptx"] = write_jsonl(root / "ptx.jsonl", [{"text": "the cat sat on the mat ."}, {"text": "a dog ran far"}])
    return out


def config(lab, out: str, base: str = "gpt2", **kw) -> PPOConfig:
    base_kw = dict(
        policy=str(lab[base]),
        reward_model=str(lab[f"{base}-rm"]),
        prompts=str(lab["prompts"]),
        batch_size=8,
        minibatch_size=4,
        ppo_epochs=2,
        max_new_tokens=6,
        total_episodes=24,
        lr=3e-3,
        warmup_steps=0,
        seed=1,
        lora_r=4,
        lora_alpha=8.0,
        out_dir=str(lab["root"] / out),
    )
    return make(PPOConfig, **{**base_kw, **kw})


def plain_name(name: str) -> str:
    """A peft-injected parameter's name in the model it was injected into."""
    for part in (".base_layer", ".modules_to_save.default", ".original_module"):
        name = name.replace(part, "")
    return name


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits


IDS = torch.randint(3, 300, (3, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")  # peft loading adapter/
@pytest.mark.parametrize("base, checkpointing", [("gpt2", True), ("llama", False)])
def test_adapters_train_over_a_frozen_base_the_reference_shares(lab, monkeypatch, base, checkpointing):
    seen = {}
    real_open, real_save = ppo_loop.open_run, ppo_loop._save_outputs

    def opener(cfg):
        run = real_open(cfg)
        seen["init"] = {n: p.detach().clone() for n, p in run.policy.named_parameters() if p.requires_grad}
        return run

    def save(run, out):  # the end of training, before the adapters are merged
        seen["run"], seen["logits"] = run, logits(run.policy, IDS)
        seen["trained"] = {n: p.detach().clone() for n, p in run.policy.named_parameters()}
        seen["value"] = {n: p.detach().clone() for n, p in run.value_model.named_parameters()}
        seen["ref"] = [(n, p.data_ptr()) for n, p in run.ref_policy.named_parameters()]
        seen["ptrs"] = {
            k: {p.data_ptr() for p in getattr(run, k).parameters()}
            for k in ("policy", "ref_policy", "reward_model", "value_model")
        }
        return real_save(run, out)

    monkeypatch.setattr(ppo_loop, "open_run", opener)
    monkeypatch.setattr(ppo_loop, "_save_outputs", save)
    cfg = config(lab, f"train-{base}", base, gradient_checkpointing=checkpointing, ptx_data=str(lab["ptx"]))
    out, summary = ppo_loop.train(cfg)
    run, trained = seen["run"], seen["trained"]

    # π_SFT is the policy's own base: the very same tensors, and no other copy of them.
    base_ptrs = {p.data_ptr() for n, p in run.policy.named_parameters() if "lora_" not in n}
    assert {ptr for _, ptr in seen["ref"]} == base_ptrs and all("lora_" not in n for n, _ in seen["ref"])
    ptrs = seen["ptrs"]
    assert ptrs["ref_policy"] <= ptrs["policy"] and run.ema is None
    assert not ptrs["policy"] & (ptrs["reward_model"] | ptrs["value_model"])
    # The base is what SFT left; every adapter weight moved (B from 0).
    sft = dict(load_causal_lm(lab[base]).named_parameters())
    for name, p in trained.items():
        if "lora_" not in name:
            assert torch.equal(p, sft[plain_name(name)]), f"base weight {name} changed"
    assert seen["init"] and all(not torch.equal(trained[n], p0) for n, p0 in seen["init"].items())
    assert all("lora_" in n for n in seen["init"])
    # The value model: adapters over the RM's frozen backbone, its scalar head trained whole.
    rm = dict(load_reward_model(lab[f"{base}-rm"]).named_parameters())
    for name, p in seen["value"].items():
        if "lora_" not in name and "modules_to_save" not in name:
            assert torch.equal(p, rm[plain_name(name)]), f"value base weight {name} changed"
    assert not torch.equal(seen["value"]["score.modules_to_save.default.weight"], rm["score.weight"])

    # policy/ and value/: plain transformers models, adapters merged; adapter/: peft's.
    merged = AutoModelForCausalLM.from_pretrained(out / "policy", local_files_only=True)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, IDS), seen["logits"], rtol=0, atol=1e-5)
    unmerged = peft.PeftModel.from_pretrained(load_causal_lm(lab[base]), out / "adapter")
    torch.testing.assert_close(logits(unmerged, IDS), seen["logits"], rtol=0, atol=1e-5)
    value = AutoModelForSequenceClassification.from_pretrained(out / "value", local_files_only=True)
    assert not any("lora" in n or "modules_to_save" in n for n, _ in value.named_parameters())
    # The checkpoint holds what trains: adapters, and the value model's head.
    ckpt = out / "checkpoint"
    assert all("lora_" in k for k in load_file(str(ckpt / "policy.safetensors")))
    assert all("lora_" in k or "modules_to_save" in k for k in load_file(str(ckpt / "value.safetensors")))
    assert summary["skipped_updates"] == 0


def test_at_lr_zero_the_first_step_is_pi_sft_exactly(lab):
    cfg = config(lab, "lr0", lr=0.0, total_episodes=8, val_prompts=str(lab["val"]), eval_every=1)
    out, _ = ppo_loop.train(cfg)
    start, first = read_metrics(out / "metrics.jsonl")[:2]
    assert first["ppo/policy/ratio_min"] == 1.0 == first["ppo/policy/ratio_max"]
    assert first["ppo/policy/clipfrac"] == 0.0
    # B = 0: the adapted policy computes exactly what its base does with the adapters off.
    assert first["objective/kl"] == 0.0 and start["eval/kl"] == 0.0 == first["eval/kl"]


def test_a_resumed_lora_run_ends_identical_to_an_uninterrupted_one(lab, monkeypatch):
    kw = dict(save_every=2, total_episodes=32, adaptive_kl=True, kl_horizon=100, ptx_data=str(lab["ptx"]))
    whole, _ = ppo_loop.train(config(lab, "whole", **kw))
    real = ppo_loop.ppo_step

    def crash(run, step):
        if step == 3:
            raise KeyboardInterrupt
        return real(run, step)

    monkeypatch.setattr(ppo_loop, "ppo_step", crash)
    with pytest.raises(KeyboardInterrupt):
        ppo_loop.train(config(lab, "resumed", **kw))
    monkeypatch.setattr(ppo_loop, "ppo_step", real)
    resumed, summary = ppo_loop.train(config(lab, "resumed", **kw))
    assert summary["resumed_from_step"] == 2
    for name in ("policy/model.safetensors", "value/model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    untimed = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
    assert untimed(read_metrics(whole / "metrics.jsonl")) == untimed(read_metrics(resumed / "metrics.jsonl"))
    with pytest.raises(InputError, match="lora_r"):  # a changed rank is another trajectory
        ppo_loop.train(config(lab, "resumed", **dict(kw, lora_r=8)))


def test_lora_settings_are_checked(lab):
    with pytest.raises(ConfigError, match="ema_decay"):
        validate(config(lab, "x", ema_decay=0.99))
    with pytest.raises(ConfigError, match="lora_r"):
        validate(config(lab, "x", lora_r=-1))
    with pytest.raises(InputError) as e:
        ppo_loop.train(config(lab, "never", lora_target_modules=["no_such_layer"]))
    assert e.value.field == "lora_target_modules"
    assert not (lab["root"] / "never").exists()


def test_rlhflab_imports_and_refuses_lora_in_one_line_without_peft(lab):
    code = (
        "import sys; sys.modules['peft'] = None\n"  # as if peft were not installed
        "import rlhflab.cli, rlhflab.adapters, rlhflab.stages.ppo as ppo\n"
        "from rlhflab.config import validate\n"
        "kw = dict(policy='p', reward_model='r', prompts='q')\n"
        "validate(ppo.PPOConfig(**kw))\n"
        "try:\n"
        "    validate(ppo.PPOConfig(**kw, lora_r=8))\n"
        "except Exception as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "field 'lora_r': needs peft: pip install 'rlhflab[lora]' (got 8)"


def test_the_reference_forward_is_the_base_model(lab):
    policy, value = load_causal_lm(lab["llama"]).eval(), load_reward_model(lab["llama-rm"]).eval()
    sft = logits(policy, IDS)
    lora = adapters.add_lora(policy, value, 4, 8.0, "all-linear")
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # adapters that change the output
    ref = adapters.Reference(lora.policy)
    assert not torch.equal(logits(policy, IDS), sft)
    assert torch.equal(logits(ref, IDS), sft)
    assert not torch.equal(logits(policy, IDS), sft)  # the adapters are back on after it


def test_the_bench_runs_lora_and_reports_the_parameter_memory(capsys):
    assert cli.main(["bench", "--workload", "tiny", "--steps", "2", "--json", "--lora-r", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    mb = report["rlhflab"]["param_mb"]
    assert report["workload"]["lora_r"] == 4
    assert 0 < mb["trainable"] < mb["frozen"] / 5 and mb["adam_state"] >= 2 * mb["trainable"]
    assert "trainable params (MiB)" in bench.format_report(report)
    assert cli.main(["bench", "--workload", "tiny", "--lora-r", "4", "--vs", "trl"]) == 2
    assert "rlhflab alone" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("point", ["metrics:3", "swap:adapter:1"])
def test_a_lora_run_killed_mid_run_or_mid_output_resumes_to_the_same_result(lab, tmp_path, point):
    """kill -9 after step 2's row (checkpoint at 2), or while adapter/ is renamed into place
    (before the merge), then the same command: every output as an uninterrupted run's."""
    from test_kill_resume import Driver

    def argv(out):
        return [
            "ppo",
            f"--policy={lab['gpt2']}",
            f"--reward_model={lab['gpt2-rm']}",
            f"--prompts={lab['prompts']}",
            "--batch_size=8",
            "--minibatch_size=4",
            "--max_new_tokens=6",
            "--total_episodes=32",
            "--train.save_every=2",
            "--train.lr=3e-3",
            "--lora_r=4",
            "--run.device=cpu",
            f"--out_dir={out}",
        ]

    driver = Driver(tmp_path)
    try:
        assert driver.run(argv(tmp_path / "whole"))[0] == 0
        status, log = driver.run(argv(tmp_path / "killed"), {KILL_ENV: point})
        assert status == -signal.SIGKILL, log
        status, log = driver.run(argv(tmp_path / "killed"))
        assert status == 0, log
    finally:
        driver.close()
    for name in ("policy/model.safetensors", "value/model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "killed" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    rows = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
