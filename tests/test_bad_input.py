"""Bad input never gets far: every malformed data file, config value, model directory or
checkpoint makes the CLI exit 2 with one line naming the file, line or key, no traceback,
and leaves the output directory exactly as it was (a sha256 manifest before and after)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rlhflab.cli import main
from rlhflab.models import load_reward_model

from tiny import (
    WORDS,
    demo_rows,
    dotted,
    gpt2_dir,
    llama_dir,
    manifest,
    ranking_rows,
    tiny_tokenizer,
    write_jsonl,
)

LONG = " ".join(["summarize this : birds fly south in winter ."] * 40)  # > 128 tokens


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_input")
    tok = tiny_tokenizer()
    gpt2 = gpt2_dir(d / "gpt2", tok)
    rm_dir = d / "rm"
    load_reward_model(gpt2).save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    return {
        "dir": d,
        "gpt2": gpt2,
        "llama": llama_dir(d / "llama", tok),
        "rm": rm_dir,
        "demos": write_jsonl(d / "demos.jsonl", demo_rows(8)),
        "rankings": write_jsonl(d / "rankings.jsonl", ranking_rows(4, 3)),
        "prompts": write_jsonl(d / "prompts.jsonl", [{"prompt": "say red"}, {"prompt": "say one"}]),
        "corpus": write_jsonl(d / "corpus.jsonl", [{"text": WORDS}] * 6),
    }


# --------------------------------------------------------------------------- helpers


def args(**kw) -> list[str]:
    return [f"--{dotted(k)}={v}" for k, v in kw.items()]


def sft(env, t, **kw):
    return [
        "sft",
        *args(
            **{
                "base": env["gpt2"],
                "data": env["demos"],
                "out_dir": t / "out",
                "epochs": 1,
                "device": "cpu",
                **kw,
            }
        ),
    ]


def rm(env, t, **kw):
    return [
        "rm",
        *args(**{"base": env["gpt2"], "rankings": env["rankings"], "out_dir": t / "out", "device": "cpu", **kw}),
    ]


def sample(env, t, **kw):
    return [
        "sample",
        *args(
            **{
                "policy": env["gpt2"],
                "prompts": env["prompts"],
                "out": t / "out" / "samples.jsonl",
                "k_min": 2,
                "k_max": 2,
                "max_new_tokens": 4,
                "device": "cpu",
                **kw,
            }
        ),
    ]


def ppo(env, t, **kw):
    return [
        "ppo",
        *args(
            **{
                "policy": env["gpt2"],
                "reward_model": env["rm"],
                "prompts": env["prompts"],
                "out_dir": t / "out",
                "batch_size": 4,
                "minibatch_size": 2,
                "total_episodes": 4,
                "max_new_tokens": 4,
                "device": "cpu",
                **kw,
            }
        ),
    ]


def pretrain(env, t, **kw):
    return [
        "pretrain",
        *args(
            **{
                "corpus": env["corpus"],
                "tokenizer": env["gpt2"],
                "out_dir": t / "out",
                "steps": 1,
                "seq_len": 16,
                "batch_size": 2,
                "gold_prompts": 0,
                **kw,
            }
        ),
    ]


def lines(t, name: str, *rows) -> Path:
    """A file of raw lines: dicts are dumped as JSON, bytes and str written as they are."""
    data = b""
    for r in rows:
        r = json.dumps(r).encode() if isinstance(r, (dict, list)) else r
        data += (r if isinstance(r, bytes) else r.encode()) + b"\n"
    (t / name).write_bytes(data)
    return t / name


GOOD_DEMO = {"prompt": "say red", "completion": "red ."}
GOOD_RANK = {"prompt": "name a color", "responses": ["red", "red red", "red red red"], "ranking": [2, 1, 0]}


def rank_row(**kw):
    return {**GOOD_RANK, **kw}


def model_copy(env, t, name="model") -> Path:
    return Path(shutil.copytree(env["gpt2"], t / name))


def checkpoint(t, state: bytes | None = b'{"step": 1}', model: bytes | None = None) -> Path:
    ck = t / "out" / "checkpoint"
    ck.mkdir(parents=True)
    if state is not None:
        (ck / "state.json").write_bytes(state)
    if model is not None:
        (ck / "model.safetensors").write_bytes(model)
    return ck


def truncated(path: Path) -> bytes:
    data = Path(path).read_bytes()
    return data[: len(data) // 2]


# --------------------------------------------------------------------------- the cases
# Each builds its bad input under t (tmp_path) and returns (argv, text stderr must contain).


def c_demo_missing_field(env, t):
    f = lines(t, "d.jsonl", GOOD_DEMO, {"prompt": "say x"})
    return sft(env, t, data=f), f"{f}:2: field 'completion'"


def c_demo_empty_string(env, t):
    f = lines(t, "d.jsonl", GOOD_DEMO, GOOD_DEMO, {"prompt": "   ", "completion": "x"})
    return sft(env, t, data=f), f"{f}:3: field 'prompt'"


def c_demo_wrong_type(env, t):
    f = lines(t, "d.jsonl", {"prompt": "say x", "completion": 5})
    return sft(env, t, data=f), f"{f}:1: field 'completion'"


def c_demo_non_utf8(env, t):
    f = lines(t, "d.jsonl", GOOD_DEMO, b'{"prompt": "say \xff\xfe", "completion": "x"}')
    return sft(env, t, data=f), f"{f}:2:"


def c_demo_truncated_json(env, t):
    f = lines(t, "d.jsonl", GOOD_DEMO, '{"prompt": "say x", "compl')
    return sft(env, t, data=f), f"{f}:2:"


def c_demo_not_an_object(env, t):
    f = lines(t, "d.jsonl", GOOD_DEMO, ["say x", "x"])
    return sft(env, t, data=f), f"{f}:2:"


def c_demo_empty_file(env, t):
    f = lines(t, "d.jsonl", "", "  ")
    return sft(env, t, data=f), str(f)


def c_demo_file_missing(env, t):
    return sft(env, t, data=t / "nope.jsonl"), str(t / "nope.jsonl")


def c_demo_prompt_over_context(env, t):
    f = lines(t, "d.jsonl", GOOD_DEMO, {"prompt": LONG, "completion": "x"})
    return sft(env, t, data=f), f"{f}:2: field 'prompt'"


def c_demo_completion_over_context(env, t):
    f = lines(t, "d.jsonl", {"prompt": "say x", "completion": LONG})
    return sft(env, t, data=f), f"{f}:1: field 'completion'"


def c_val_demo_bad(env, t):
    f = lines(t, "v.jsonl", {"prompt": "say x", "completion": None})
    return sft(env, t, val_data=f), f"{f}:1: field 'completion'"


def c_rank_not_permutation(env, t):
    f = lines(t, "r.jsonl", GOOD_RANK, rank_row(ranking=[2, 1]))
    return rm(env, t, rankings=f), f"{f}:2: field 'ranking'"


def c_rank_repeated_index(env, t):
    f = lines(t, "r.jsonl", rank_row(ranking=[0, 0, 1]))
    return rm(env, t, rankings=f), f"{f}:1: field 'ranking'"


def c_rank_index_out_of_range(env, t):
    f = lines(t, "r.jsonl", rank_row(ranking=[0, 1, 3]))
    return rm(env, t, rankings=f), f"{f}:1: field 'ranking'"


def c_rank_negative_index(env, t):
    f = lines(t, "r.jsonl", rank_row(ranking=[-1, 0, 1]))
    return rm(env, t, rankings=f), f"{f}:1: field 'ranking'"


def c_rank_k_below_2(env, t):
    f = lines(t, "r.jsonl", rank_row(responses=["red"], ranking=[0]))
    return rm(env, t, rankings=f), f"{f}:1: field 'responses'"


def c_rank_k_above_max(env, t):
    f = lines(t, "r.jsonl", rank_row(responses=["red"] * 17, ranking=list(range(17))))
    return rm(env, t, rankings=f), f"{f}:1: field 'responses'"


def c_rank_empty_response(env, t):
    f = lines(t, "r.jsonl", GOOD_RANK, rank_row(responses=["red", "", "blue"]))
    return rm(env, t, rankings=f), f"{f}:2: field 'responses[1]'"


def c_rank_missing_ranking(env, t):
    row = dict(GOOD_RANK)
    del row["ranking"]
    f = lines(t, "r.jsonl", row)
    return rm(env, t, rankings=f), f"{f}:1: field 'ranking'"


def c_rank_wrong_type(env, t):
    f = lines(t, "r.jsonl", rank_row(ranking="210"))
    return rm(env, t, rankings=f), f"{f}:1: field 'ranking'"


def c_rank_bool_entries(env, t):
    f = lines(t, "r.jsonl", rank_row(ranking=[True, False, 2]))
    return rm(env, t, rankings=f), f"{f}:1: field 'ranking'"


def c_rank_all_tied(env, t):
    f = lines(t, "r.jsonl", rank_row(ranking=[[0, 1, 2]]))
    return rm(env, t, rankings=f), f"{f}:1: field 'ranking'"


def c_rank_responses_not_list(env, t):
    f = lines(t, "r.jsonl", rank_row(responses="red blue"))
    return rm(env, t, rankings=f), f"{f}:1: field 'responses'"


def c_pairwise_missing_rejected(env, t):
    f = lines(t, "r.jsonl", {"prompt": "name a color", "chosen": "red"})
    return rm(env, t, rankings=f), f"{f}:1: field 'rejected'"


def c_rank_prompt_over_context(env, t):
    f = lines(t, "r.jsonl", GOOD_RANK, rank_row(prompt=LONG))
    return rm(env, t, rankings=f), f"{f}:2: field 'prompt'"


def c_rank_val_non_utf8(env, t):
    f = lines(t, "v.jsonl", b"\x80\x81")
    return rm(env, t, val_rankings=f), f"{f}:1:"


def c_rm_demos_wrong_type(env, t):
    f = lines(t, "d.jsonl", {"prompt": 5, "completion": "x"})
    return rm(env, t, demos=f), f"{f}:1: field 'prompt'"


def c_prompts_missing_field(env, t):
    f = lines(t, "p.jsonl", {"prompt": "say red"}, {"text": "say red"})
    return sample(env, t, prompts=f), f"{f}:2: field 'prompt'"


def c_prompts_over_context(env, t):
    f = lines(t, "p.jsonl", {"prompt": "say red"}, {"prompt": LONG})
    return sample(env, t, prompts=f), f"{f}:2: field 'prompt'"


def c_ppo_prompts_non_utf8(env, t):
    f = lines(t, "p.jsonl", b'{"prompt": "\xc3\x28"}')
    return ppo(env, t, prompts=f), f"{f}:1:"


def c_ppo_prompt_over_context(env, t):
    f = lines(t, "p.jsonl", {"prompt": "say red"}, {"prompt": LONG})
    return ppo(env, t, prompts=f), f"{f}:2: field 'prompt'"


def c_ppo_ptx_wrong_type(env, t):
    f = lines(t, "c.jsonl", {"text": 3})
    return ppo(env, t, ptx_data=f), f"{f}:1: field 'text'"


def c_corpus_missing_field(env, t):
    f = lines(t, "c.jsonl", {"text": WORDS}, {"body": WORDS})
    return pretrain(env, t, corpus=f), f"{f}:2: field 'text'"


def c_corpus_txt_non_utf8(env, t):
    f = lines(t, "c.txt", WORDS, WORDS, b"caf\xe9 " + WORDS.encode())
    return pretrain(env, t, corpus=f), f"{f}:3:"


def c_cfg_negative_lr(env, t):
    return sft(env, t, lr=-1e-3), "field 'train.lr'"


def c_cfg_unknown_key(env, t):
    return sft(env, t, learning_rate=1e-3), "field 'learning_rate'"


def c_cfg_wrong_type(env, t):
    return sft(env, t, epochs="many"), "field 'epochs'"


def c_cfg_bool_for_int(env, t):
    return rm(env, t, batch_size="true"), "field 'batch_size'"


def c_cfg_dropout_range(env, t):
    return sft(env, t, dropout=1.5), "field 'dropout'"


def c_cfg_empty_required(env, t):
    return sft(env, t, base=""), "field 'base'"


def c_cfg_bad_yaml(env, t):
    f = lines(t, "c.yaml", "lr: 0.001", "epochs: [1, 2", "batch_size: 4")
    return ["sft", f"--config={f}", *sft(env, t)[1:]], str(f)


def c_cfg_yaml_flat_train_key(env, t):
    f = lines(t, "c.yaml", "lr: 0.001")  # lr lives in the train block
    return ["rm", f"--config={f}", *rm(env, t)[1:]], "field 'lr': unknown key"


def c_cfg_yaml_not_mapping(env, t):
    f = lines(t, "c.yaml", "- lr", "- epochs")
    return ["sft", f"--config={f}", *sft(env, t)[1:]], str(f)


def c_cfg_yaml_unknown_key(env, t):
    f = lines(t, "c.yaml", "train:", "  lr: 0.001", "epoks: 2")
    return ["rm", f"--config={f}", *rm(env, t)[1:]], "field 'epoks'"


def c_cfg_yaml_non_utf8(env, t):
    f = lines(t, "c.yaml", b"lr: 0.001 # \xff")
    return ["sft", f"--config={f}", *sft(env, t)[1:]], str(f)


def c_cfg_config_missing(env, t):
    return ["sft", f"--config={t / 'none.yaml'}", *sft(env, t)[1:]], str(t / "none.yaml")


def c_cfg_minibatch_not_dividing(env, t):
    return ppo(env, t, batch_size=6, minibatch_size=4), "field 'minibatch_size'"


def c_cfg_bad_literal(env, t):
    return pretrain(env, t, size="huge"), "field 'size'"


def c_cfg_k_min(env, t):
    return sample(env, t, k_min=1), "field 'k_min'"


def c_cfg_bad_device(env, t):
    return sft(env, t, device="warpdrive"), "field 'run.device'"


def c_model_no_config_json(env, t):
    m = model_copy(env, t)
    (m / "config.json").unlink()
    return sft(env, t, base=m), str(m)


def c_model_dir_missing(env, t):
    return rm(env, t, base=t / "nowhere"), str(t / "nowhere")


def c_model_config_not_json(env, t):
    m = model_copy(env, t)
    (m / "config.json").write_text('{"model_type": "gpt2", ')
    return sample(env, t, policy=m), str(m)


def c_model_weights_truncated(env, t):
    m = model_copy(env, t)
    (m / "model.safetensors").write_bytes(truncated(m / "model.safetensors"))
    return sft(env, t, base=m), str(m)


def c_ppo_rm_is_causal_lm(env, t):
    return ppo(env, t, reward_model=env["gpt2"]), "field 'reward_model'"


def c_ppo_value_model_empty_dir(env, t):
    (t / "empty").mkdir()
    return ppo(env, t, value_model=t / "empty"), str(t / "empty")


def c_ckpt_truncated(env, t):
    checkpoint(t, model=truncated(env["gpt2"] / "model.safetensors"))
    return sft(env, t), str(t / "out" / "checkpoint")


def c_ckpt_foreign(env, t):
    checkpoint(t, model=(env["llama"] / "model.safetensors").read_bytes())
    return sft(env, t), str(t / "out" / "checkpoint")


def c_ckpt_state_not_json(env, t):
    checkpoint(t, state=b'{"step": 3, "conf', model=(env["gpt2"] / "model.safetensors").read_bytes())
    return rm(env, t), str(t / "out" / "checkpoint")


def c_ckpt_pretrain_truncated(env, t):
    checkpoint(t, model=truncated(env["gpt2"] / "model.safetensors"))
    return pretrain(env, t), str(t / "out" / "checkpoint")


def c_ckpt_ppo_state_not_json(env, t):
    checkpoint(t, state=b"\x00\x01 not json")
    return ppo(env, t), str(t / "out" / "checkpoint")


CASES = {name[2:]: fn for name, fn in dict(globals()).items() if name.startswith("c_")}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_cleanly_and_writes_nothing(env, tmp_path, capsys, case):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("a previous stage's output\n")
    (out / "config.yaml").write_text("lr: 0.5\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    argv, names = CASES[case](env, tmp_path)
    watched = (out, env["gpt2"], env["rm"])
    before = manifest(*watched)
    capsys.readouterr()

    code = main([str(a) for a in argv])

    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1 and err.strip(), err
    assert err.startswith("error: "), err
    assert names in err, f"expected {names!r} in {err!r}"
    assert manifest(*watched) == before
