"""Conversational data end to end: TRL's formats, HH transcripts, parquet and save_to_disk
files, the chat template in every stage, the assistant-only loss mask, and SFT -> RM ->
PPO on eight architectures, each with its own tokenizer and chat template."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rlhflab.cli import main
from rlhflab.data import Message, read_demos, read_prompts, read_rankings
from rlhflab.models import load_tokenizer
from rlhflab.stages import rm, sft
from rlhflab.stages.ppo import PPOConfig
from rlhflab.stages.ppo import loop as ppo_loop
from rlhflab.stages.ppo.run import open_run
from rlhflab.text import encode_pair, encode_query, pad_left

from chat_models import ARCHS, chat_model_dir, chat_tokenizer
from tiny import gpt2_dir, make, manifest, tiny_tokenizer, write_jsonl

WORDS = "cat dog mat red blue green one two three four".split()


def msgs(*turns):
    return [{"role": r, "content": c} for r, c in turns]


def demo_rows(n: int = 8) -> list[dict]:
    """Conversations in three of TRL's forms: messages (with a system turn, multi-turn) and
    conversational prompt/completion; the answer repeats the last word."""
    rows = []
    for i in range(n):
        w, v = WORDS[i % len(WORDS)], WORDS[(i + 3) % len(WORDS)]
        if i % 3 == 0:
            rows.append({"messages": msgs(("system", "be brief"), ("user", f"say {w}"), ("assistant", f"{w} ."))})
        elif i % 3 == 1:
            turns = (("user", f"say {v}"), ("assistant", f"{v} ."), ("user", f"say {w}"), ("assistant", f"{w} ."))
            rows.append({"messages": msgs(*turns)})
        else:
            rows.append({"prompt": msgs(("user", f"say {w}")), "completion": msgs(("assistant", f"{w} ."))})
    return rows


def ranking_rows(n: int = 6) -> list[dict]:
    """Longer is better: K = 3 assistant messages, an explicit pair, an implicit pair."""
    rows = []
    for i in range(n):
        prompt = msgs(("user", f"name a color {WORDS[i % len(WORDS)]}"))
        answers = [" ".join(["red"] * (j + 1)) for j in range(3)]
        if i % 3 == 0:
            responses = [{"role": "assistant", "content": a} for a in answers]
            rows.append({"prompt": prompt, "responses": responses, "ranking": [2, 1, 0]})
        elif i % 3 == 1:
            rows.append({"prompt": prompt, "chosen": msgs(("assistant", answers[2])), "rejected": answers[0]})
        else:
            chosen, rejected = prompt + msgs(("assistant", answers[1])), prompt + msgs(("assistant", answers[0]))
            rows.append({"chosen": chosen, "rejected": rejected})
    return rows


def prompt_rows(n: int = 8) -> list[dict]:
    return [{"prompt": msgs(("system", "be brief"), ("user", f"say {WORDS[i % len(WORDS)]}"))} for i in range(n)]


# --------------------------------------------------------------------------- reading


def test_every_trl_format_reads_as_the_same_conversation(tmp_path):
    p = msgs(("system", "be brief"), ("user", "say cat"))
    forms = [
        {"messages": p + msgs(("assistant", "cat ."))},
        {"prompt": p, "completion": msgs(("assistant", "cat ."))},
        {"prompt": p, "completion": "cat ."},
    ]
    demos = read_demos(write_jsonl(tmp_path / "d.jsonl", forms))
    want = (Message("system", "be brief"), Message("user", "say cat"))
    assert {(d.prompt, d.completion) for d in demos} == {(want, "cat .")}
    assert all(d.conversation == (*want, Message("assistant", "cat .")) for d in demos)

    pairs = [
        {"prompt": p, "chosen": msgs(("assistant", "a b")), "rejected": msgs(("assistant", "a"))},
        {"chosen": p + msgs(("assistant", "a b")), "rejected": p + msgs(("assistant", "a"))},
        {"prompt": p, "responses": [{"role": "assistant", "content": "a"}, "a b"], "ranking": [1, 0]},
    ]
    ranked = read_rankings(write_jsonl(tmp_path / "r.jsonl", pairs))
    assert {r.prompt for r in ranked} == {want}
    assert [r.responses[r.order[0]] for r in ranked] == ["a b"] * 3  # the better answer first

    prompts = read_prompts(write_jsonl(tmp_path / "p.jsonl", [{"prompt": p}, {"messages": p}, {"prompt": "plain"}]))
    assert prompts == [want, want, "plain"]


def test_hh_transcripts_read_as_conversations(tmp_path):
    chosen = "\n\nHuman: say cat\n\nAssistant: cat .\n\nHuman: and dog?\n\nAssistant: dog ."
    rejected = "\n\nHuman: say cat\n\nAssistant: cat .\n\nHuman: and dog?\n\nAssistant: no"
    (r,) = read_rankings(write_jsonl(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": rejected}]))
    assert r.prompt == (Message("user", "say cat"), Message("assistant", "cat ."), Message("user", "and dog?"))
    assert r.responses == ("dog .", "no")
    (d,) = read_demos(
        write_jsonl(tmp_path / "d.jsonl", [{"prompt": "\n\nHuman: hi\n\nAssistant:", "completion": " yo"}])
    )
    assert d.conversation == (Message("user", "hi"), Message("assistant", "yo"))


def test_parquet_and_save_to_disk_read_like_jsonl(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r for r in demo_rows(9) if "messages" in r]  # one schema per file, as columnar files have
    want = read_demos(write_jsonl(tmp_path / "d.jsonl", rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "d.parquet", tmp_path / "saved"):
        got = read_demos(path)
        assert [(d.prompt, d.completion, d.conversation) for d in got] == [
            (d.prompt, d.completion, d.conversation) for d in want
        ]
        assert [d.line for d in got] == list(range(1, 7))  # rows numbered from 1
        assert any(len(d.conversation) == 4 for d in got) and any(d.prompt[0].role == "system" for d in got)


# --------------------------------------------------------------------------- rendering


def test_assistant_only_loss_mask_matches_a_hand_rendered_template(tmp_path):
    tok = chat_tokenizer("qwen2")  # ChatML: eos <|im_end|> closes every turn
    conv = msgs(("system", "be brief"), ("user", "say cat"), ("assistant", "cat ."), ("user", "say dog"))
    conv += msgs(("assistant", "dog ."))
    pieces = [  # (text, carries the loss in 'all' mode, in 'last' mode)
        ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nsay cat<|im_end|>\n<|im_start|>assistant\n", 0, 0),
        ("cat .<|im_end|>", 1, 0),
        ("\n<|im_start|>user\nsay dog<|im_end|>\n<|im_start|>assistant\n", 0, 0),
        ("dog .<|im_end|>", 1, 1),
    ]
    ids, all_mask, last_mask = [], [], []
    for text, in_all, in_last in pieces:
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids += t
        all_mask += [in_all] * len(t)
        last_mask += [in_last] * len(t)
    assert tok.apply_chat_template(conv, tokenize=True, return_dict=False)[: len(ids)] == ids

    for turns, mask in (("all", all_mask), ("last", last_mask)):
        f = write_jsonl(tmp_path / f"{turns}.jsonl", [{"messages": conv}])
        ((got_ids, spans),) = sft.encode_demos(tok, str(f), None, turns)
        _, _, labels = sft.sft_batch([(got_ids, spans)], tok.pad_token_id)
        assert got_ids == ids
        assert (labels[0] != sft.IGNORE).long().tolist() == mask
        assert labels[0][labels[0] != sft.IGNORE].tolist() == [i for i, m in zip(ids, mask) if m]


def test_a_template_without_eos_gets_one_after_the_answer():
    tok = chat_tokenizer("gemma")  # <end_of_turn> closes a turn; eos is <eos>, never written by the template
    prompt = (Message("user", "say cat"),)
    query, response = encode_pair(tok, prompt, "cat .")
    rendered = tok.apply_chat_template(msgs(("user", "say cat"), ("assistant", "cat .")), return_dict=False)
    assert query == tok.apply_chat_template(msgs(("user", "say cat")), add_generation_prompt=True, return_dict=False)
    assert query + response == list(rendered) + [tok.eos_token_id]
    assert response.count(tok.eos_token_id) == 1 and response[-1] == tok.eos_token_id


def test_lab_template_renders_one_turn_as_the_string_layout():
    tok = tiny_tokenizer()
    for prompt, answer in (("say cat", "cat ."), ("summarize this : birds fly south", "birds fly")):
        conv = (Message("user", prompt),)
        assert encode_query(tok, conv) == encode_query(tok, prompt)
        assert encode_pair(tok, conv, answer) == encode_pair(tok, prompt, answer)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_left_padded_ppo_queries_are_the_chat_templates_generation_prompt(tmp_path, arch):
    policy = chat_model_dir(tmp_path / "policy", arch)
    rm_dir = tmp_path / "rm"
    from rlhflab.models import load_reward_model

    load_reward_model(policy).save_pretrained(rm_dir)
    load_tokenizer(policy).save_pretrained(rm_dir)
    rows = prompt_rows(5) + [{"prompt": msgs(("user", "a much longer question about the cat on the mat"))}]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = make(
        PPOConfig, policy=str(policy), reward_model=str(rm_dir), prompts=str(prompts), out_dir=str(tmp_path / "o")
    )
    run = open_run(cfg)
    tok = load_tokenizer(policy)
    want = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, return_dict=False) for r in rows]
    assert run.queries == [list(w) for w in want]
    ids, mask = pad_left(run.queries, tok.pad_token_id)  # how generation batches them
    assert len({len(q) for q in run.queries}) > 1  # some rows really are padded
    for row, q in zip(range(len(rows)), want):
        assert ids[row, mask[row].bool()].tolist() == list(q)  # token by token, pads only on the left
        assert mask[row, -len(q) :].all() and not mask[row, : -len(q)].any()


# --------------------------------------------------------------------------- eight architectures


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sft_rm_ppo_on_conversational_data(tmp_path, arch):
    base = chat_model_dir(tmp_path / "base", arch)
    demos = write_jsonl(tmp_path / "demos.jsonl", demo_rows(8))
    ranks = write_jsonl(tmp_path / "ranks.jsonl", ranking_rows(6))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(8))
    common = dict(device="cpu", seed=0)

    sft_dir, summary = sft.train(
        make(sft.SFTConfig, base=str(base), data=str(demos), out_dir=str(tmp_path / "sft"), epochs=3, lr=3e-3, **common)
    )
    rows = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["sft/loss"] for r in rows if "sft/loss" in r]
    assert sum(losses[-2:]) < sum(losses[:2]), losses  # it learns the template's answers
    assert load_tokenizer(sft_dir).chat_template == chat_tokenizer(arch).chat_template

    rm_dir, _ = rm.train(
        make(rm.RMConfig, base=str(sft_dir), rankings=str(ranks), out_dir=str(tmp_path / "rm"), lr=1e-3, **common)
    )
    before = load_file(str(sft_dir / "model.safetensors"))
    ppo_dir, ppo_summary = ppo_loop.train(
        make(
            PPOConfig,
            policy=str(sft_dir),
            reward_model=str(rm_dir),
            prompts=str(prompts),
            out_dir=str(tmp_path / "ppo"),
            batch_size=4,
            minibatch_size=2,
            ppo_epochs=1,
            max_new_tokens=4,
            total_episodes=8,
            lr=1e-3,
            **common,
        )
    )
    after = load_file(str(ppo_dir / "policy" / "model.safetensors"))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, f"PPO changed only {changed}"
    assert all(torch.isfinite(v).all() for v in after.values())


# --------------------------------------------------------------------------- bad rows


BAD = {
    "missing_role": ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages[0].role"),
    "unknown_role": ({"messages": msgs(("robot", "hi"), ("assistant", "yo"))}, "messages[0].role"),
    "content_not_string": (
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "yo"}]},
        "messages[0].content",
    ),
    "empty_conversation": ({"messages": []}, "messages"),
    "assistant_turn_missing": ({"messages": msgs(("user", "hi"))}, "messages"),
    "no_shared_prefix": (
        {"chosen": msgs(("user", "a"), ("assistant", "b")), "rejected": msgs(("user", "c"), ("assistant", "d"))},
        "rejected",
    ),
    "pair_without_assistant": (
        {"chosen": msgs(("user", "a"), ("assistant", "b")), "rejected": msgs(("user", "a"))},
        "rejected",
    ),
    "no_chat_template": ({"messages": msgs(("user", "hi"), ("assistant", "yo"))}, "messages"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_conversational_row_is_refused_naming_file_row_field(tmp_path, capsys, case):
    row, field = BAD[case]
    base = gpt2_dir(tmp_path / "base", tiny_tokenizer())
    if case == "no_chat_template":
        config = json.loads((base / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (base / "tokenizer_config.json").write_text(json.dumps(config))
        (base / "chat_template.jinja").unlink(missing_ok=True)
        assert not load_tokenizer(base).chat_template
    good = demo_rows(3) if "chosen" not in row else ranking_rows(3)
    if case == "no_chat_template":
        good = [{"prompt": "say cat", "completion": "cat ."}] * 3  # string rows need no template
    f = write_jsonl(tmp_path / "data.jsonl", [*good, row])  # the bad row is row 4
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("a previous stage's output\n")
    before = manifest(out, base)
    if "chosen" in row:
        argv = ["rm", f"--base={base}", f"--rankings={f}", f"--out_dir={out}", "--run.device=cpu"]
    else:
        argv = ["sft", f"--base={base}", f"--data={f}", f"--out_dir={out}", "--run.device=cpu", "--epochs=1"]
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{f}:4: field '{field}'" in err, err
    assert manifest(out, base) == before
