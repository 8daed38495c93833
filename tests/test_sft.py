"""SFT: response-only loss, EOS learned, training moves every weight, resume is exact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rlhflab.checkpoint import load_checkpoint, save_checkpoint
from rlhflab.cli import main
from rlhflab.errors import InputError
from rlhflab.models import load_causal_lm, load_reward_model, load_tokenizer
from rlhflab.stages import sft
from rlhflab.text import encode_query, encode_response

from tiny import demo_rows, gpt2_dir, llama_dir, make, ranking_rows, tiny_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    tok = tiny_tokenizer()
    return {
        "dir": d,
        "tok": tok,
        "gpt2": gpt2_dir(d / "gpt2", tok),
        "llama": llama_dir(d / "llama", tok),
        "demos": write_jsonl(d / "demos.jsonl", demo_rows(12)),
        "val": write_jsonl(d / "val.jsonl", demo_rows(16)[12:]),
        "prompts": write_jsonl(d / "prompts.jsonl", [{"prompt": "say red"}, {"prompt": "say one"}]),
    }


def config(world, out, base="gpt2", **kw):
    kw = {"epochs": 2, "batch_size": 4, "lr": 1e-3, "device": "cpu", **kw}
    return make(sft.SFTConfig, base=str(world[base]), data=str(world["demos"]), out_dir=str(out), **kw)


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


# --------------------------------------------------------------------------- the loss


def test_loss_is_on_response_tokens_only_and_every_eos_is_a_label(world):
    tok = world["tok"]
    pairs = [("say cat", "cat ."), ("summarize this : birds fly south", "birds fly"), ("yes", "no")]
    examples = [(encode_query(tok, p), encode_response(tok, c)) for p, c in pairs]
    ids, mask, labels = sft.sft_batch([sft.example(q, r) for q, r in examples], tok.pad_token_id)
    for i, (q, r) in enumerate(examples):
        assert (labels[i, : len(q)] == sft.IGNORE).all()  # prompt masked
        assert labels[i, len(q) : len(q) + len(r)].tolist() == r  # response labelled
        assert (labels[i, len(q) + len(r) :] == sft.IGNORE).all()  # padding masked
        assert labels[i, len(q) + len(r) - 1] == tok.eos_token_id  # EOS is a label
    assert int((labels == tok.eos_token_id).sum()) == len(examples)

    # d loss / d logits is exactly 0 wherever the next token is a prompt (or pad) token:
    # prompt tokens only condition the prediction, they are never predicted.
    logits = torch.randn(*ids.shape, len(tok), requires_grad=True)
    sft.sft_loss(logits, labels).backward()
    predicts_response = torch.zeros_like(labels, dtype=torch.bool)
    predicts_response[:, :-1] = labels[:, 1:] != sft.IGNORE
    assert (logits.grad[~predicts_response] == 0).all()
    assert (logits.grad[predicts_response].abs().sum(-1) > 0).all()

    # And with a real model the loss is the mean NLL of response tokens, nothing else.
    model = load_causal_lm(world["gpt2"]).eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        loss = sft.sft_loss(out, labels)
        logp = torch.log_softmax(out[:, :-1].float(), -1)  # the full-vocabulary formula
        lp = logp.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
        expected = -lp[labels[:, 1:] != sft.IGNORE].mean()
    torch.testing.assert_close(loss, expected)


def test_prompt_changes_reach_the_loss_only_through_conditioning(world):
    # A "model" that ignores its input (one learned logit vector for every position): with
    # no conditioning to go through, changing the prompt must change neither loss nor grad.
    tok = world["tok"]
    r = encode_response(tok, "cat .")
    results = []
    for prompt in ("say cat", "summarize this : birds fly south in winter"):
        bias = torch.zeros(len(tok), requires_grad=True)
        ids, _, labels = sft.sft_batch([sft.example(encode_query(tok, prompt), r)], tok.pad_token_id)
        loss = sft.sft_loss(bias.expand(*ids.shape, -1), labels)
        loss.backward()
        results.append((loss.detach(), bias.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("arch,precision", [("gpt2", "fp32"), ("llama", "fp32"), ("gpt2", "bf16")])
def test_sft_learns_and_changes_every_parameter(world, tmp_path, arch, precision):
    out, summary = sft.train(
        config(world, tmp_path / "out", base=arch, epochs=3, val_data=str(world["val"]), precision=precision)
    )
    losses = [e["val_loss"] for e in summary["epochs"]]
    assert losses[-1] < losses[0]
    before, after = weights(world[arch]), weights(out)
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged
    assert out == tmp_path / "out" / "model"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert {p.name for p in out.parent.iterdir()} == {"model", "metrics.jsonl", "config.yaml", "summary.json"}
    rows = [json.loads(line) for line in (out.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "sft/loss" in r] == list(range(1, summary["steps"] + 1))
    # Dropout was on while training, but the saved config keeps the base's values.
    cfg = json.loads((out / "config.json").read_text())
    assert summary["dropout_fields"]
    assert all(cfg[k] == 0.0 for k in summary["dropout_fields"])
    assert load_causal_lm(out) is not None


def test_pretraining_mix_is_its_share_of_the_loss_and_teaches_the_text(world, tmp_path):
    """App. C.3's init: demonstrations with pretraining texts mixed in at a share of the
    labelled tokens; those texts carry the loss on every token and are learned."""
    text = "the moon is made of cheese and the sun is made of fire"
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": f"{text} {i}"} for i in range(40)])
    inp = sft.read_inputs(config(world, tmp_path / "x", ptx_data=str(corpus), ptx_fraction=0.25))
    demos, ptx = inp.train_set[: -inp.ptx_texts], inp.train_set[-inp.ptx_texts :]
    assert len(demos) == 12 and inp.ptx_texts >= 1
    share = sft.n_labelled(ptx) / sft.n_labelled(inp.train_set)
    one = sft.n_labelled(ptx[:1]) / (sft.n_labelled(demos) + sft.n_labelled(ptx[:1]))
    assert 0.25 <= share < 0.25 + one  # drawn until the share is reached, not beyond
    ids, _, labels = sft.sft_batch(ptx[:1], world["tok"].pad_token_id)
    assert labels[0, 1:].tolist() == ids[0, 1:].tolist()  # every token after bos is a label

    def text_nll(model) -> float:
        with torch.no_grad():
            return float(sft.forward_loss(model.eval(), ptx, world["tok"].pad_token_id, "cpu"))

    base = text_nll(load_causal_lm(world["gpt2"]))
    plain, _ = sft.train(config(world, tmp_path / "plain", epochs=3))
    mixed, summary = sft.train(config(world, tmp_path / "mixed", epochs=3, ptx_data=str(corpus), ptx_fraction=0.25))
    assert summary["ptx_texts"] == inp.ptx_texts and summary["examples"] == 12
    assert text_nll(load_causal_lm(mixed)) < min(base, text_nll(load_causal_lm(plain))) - 0.5


def test_training_dropout_is_set_on_the_architecture(world):
    gpt2, _ = sft.load_policy(str(world["gpt2"]), 0.2)
    assert gpt2.config.resid_pdrop == gpt2.config.embd_pdrop == gpt2.config.attn_pdrop == 0.2
    assert gpt2.transformer.drop.p == 0.2
    llama, original = sft.load_policy(str(world["llama"]), 0.2)
    assert llama.config.attention_dropout == 0.2 and set(original) == {"attention_dropout"}


@pytest.mark.parametrize("save_every, stop_at, epoch, batch", [(3, 4, 1, 0), (2, 5, 1, 1)])
def test_resume_after_interrupt_gives_identical_weights(world, tmp_path, save_every, stop_at, epoch, batch):
    ref, _ = sft.train(config(world, tmp_path / "ref", epochs=3))

    def interrupt(step, row):
        if step == stop_at:
            raise KeyboardInterrupt

    cfg = config(world, tmp_path / "run", epochs=3, save_every=save_every)
    with pytest.raises(KeyboardInterrupt):
        sft.train(cfg, callback=interrupt)
    # 3 steps per epoch: resume at an epoch boundary, or in the middle of the second epoch.
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert (state["epoch"], state["batch"]) == (epoch, batch)
    # A different config cannot silently continue this checkpoint.
    with pytest.raises(InputError, match="lr"):
        sft.train(config(world, tmp_path / "run", epochs=3, save_every=save_every, lr=5e-4))
    out, summary = sft.train(cfg)
    a, b = weights(ref), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (out.parent / "metrics.jsonl").read_text().splitlines() if "sft/loss" in x]
    assert steps == list(range(1, 10))


def test_checkpoint_round_trips(world, tmp_path):
    def stop(step, row):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sft.train(config(world, tmp_path / "run", save_every=2), callback=stop)
    model, _ = sft.load_policy(str(world["gpt2"]), 0.2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    state = load_checkpoint(tmp_path / "run", {"model": model}, {"optimizer": opt})
    assert state["step"] == 2 and state["scheduler"]["last_epoch"] == 2
    save_checkpoint(tmp_path / "copy", {"model": model}, {"optimizer": opt}, state)
    for name in ("model.safetensors", "optimizer.optim.safetensors"):
        a = load_file(str(tmp_path / "run" / "checkpoint" / name))
        b = load_file(str(tmp_path / "copy" / "checkpoint" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    key = "transformer.h.0.mlp.c_fc.weight"  # training moved it
    assert not torch.equal(weights(world["gpt2"])[key], a[key])


def test_reward_model_chooses_the_epoch(world, tmp_path):
    from rlhflab.stages import rm

    ranks = write_jsonl(tmp_path / "ranks.jsonl", ranking_rows(4))
    rm_dir, _ = rm.train(
        make(
            rm.RMConfig,
            base=str(world["gpt2"]),
            rankings=str(ranks),
            out_dir=str(tmp_path / "rm"),
            device="cpu",
        )
    )
    cfg = config(
        world,
        tmp_path / "out",
        base="llama",
        epochs=3,
        reward_model=str(rm_dir),
        val_prompts=str(world["prompts"]),
        val_max_new_tokens=8,
    )
    out, summary = sft.train(cfg)
    scores = [e["val_score"] for e in summary["epochs"]]
    assert summary["selected_by"] == "reward_model"
    assert summary["best_epoch"] == 1 + scores.index(max(scores))
    # The kept weights are the chosen epoch's: the same seeded samples score the same.
    again = sft.rm_score(
        load_causal_lm(out),
        load_tokenizer(out),
        ["say red", "say one"],
        load_reward_model(rm_dir),
        load_tokenizer(rm_dir),
        cfg,
    )
    assert again == pytest.approx(max(scores), abs=1e-5)


# --------------------------------------------------------------------------- the command


@pytest.mark.parametrize(
    "rows, field",
    [
        ([{"prompt": "cat " * 200, "completion": "ok"}], "prompt"),
        ([{"prompt": "say cat", "completion": "cat " * 200}], "completion"),
        ([{"prompt": "say cat", "completion": "  "}], "completion"),
        ([{"prompt": "say cat"}], "completion"),
    ],
)
def test_bad_demos_are_refused_before_anything_is_written(world, tmp_path, capsys, rows, field):
    data = write_jsonl(tmp_path / "bad.jsonl", demo_rows(3) + rows)
    out = tmp_path / "out"
    rc = main(["sft", f"--base={world['gpt2']}", f"--data={data}", f"--out_dir={out}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1
    assert f"{data}:4:" in err and f"field '{field}'" in err
    assert not out.exists()


def test_cli_trains_and_help_config_lists_keys(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sft", "--help-config"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "dropout = 0.2" in text and "epochs = 16" in text and "reward_model" in text
    out = tmp_path / "out"
    rc = main(["sft", f"--base={world['gpt2']}", f"--data={world['demos']}", f"--out_dir={out}", "--epochs=1"])
    assert rc == 0 and (out / "summary.json").is_file()
    assert (out / "model" / "config.json").is_file()
