"""One real example per stage for the report's walkthrough (`<run>/walkthrough.json`).

An SFT demonstration, a ranked set of K responses with their reward-model scores and
gold quality, and one PPO episode with its numbers: RM score, KL to the SFT model, and
the KL-shaped return r − β·KL (§3.5, eq. 2).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from rlhflab.data import read_demos, read_prompts, read_rankings
from rlhflab.generation import sample
from rlhflab.io import write_json
from rlhflab.models import load_causal_lm, load_reward_model, load_tokenizer, reward_scores, token_logprobs
from rlhflab.rm import score_pairs
from rlhflab.text import decode_response, encode_query, pad_right
from rlhflab.world import load_world


@torch.no_grad()
def ppo_episode(policy_dir: Path, ref_dir: Path, rm_dir: Path, prompt: str, kl_coef: float,
                max_new_tokens: int = 48, seed: int = 0) -> dict:
    policy, ref = load_causal_lm(policy_dir).eval(), load_causal_lm(ref_dir).eval()
    rm, tok = load_reward_model(rm_dir).eval(), load_tokenizer(policy_dir)
    query = encode_query(tok, prompt)
    gen = sample(policy, [query], pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                 max_new_tokens=max_new_tokens, generator=torch.Generator().manual_seed(seed))
    n = int(gen.mask[0].sum())
    response = gen.responses[0, :n].tolist()
    ids, mask = pad_right([query + response], tok.pad_token_id)
    labels = ids[:, len(query):]  # the response tokens, each predicted from the position before
    logp = token_logprobs(policy(input_ids=ids, attention_mask=mask).logits[:, len(query) - 1:-1], labels)
    ref_logp = token_logprobs(ref(input_ids=ids, attention_mask=mask).logits[:, len(query) - 1:-1], labels)
    kl = float((logp - ref_logp).sum())
    score = float(reward_scores(rm, ids, mask)[0])
    return {"prompt": prompt, "response": decode_response(tok, response), "rm_score": round(score, 4),
            "kl": round(kl, 4), "kl_coef": kl_coef, "reward": round(score - kl_coef * kl, 4)}


def write_walkthrough(root: Path, world_dir: Path, rm_dir: Path, ppo_dir: Path, sft_dir: Path) -> dict:
    world = load_world(world_dir)
    demo = read_demos(world_dir / "sft_train.jsonl")[0]
    ranked = read_rankings(world_dir / "rm_val.jsonl")[0]
    rm, tok = load_reward_model(rm_dir).eval(), load_tokenizer(rm_dir)
    scores = score_pairs(rm, tok, [ranked.prompt] * len(ranked.responses), list(ranked.responses))
    labeler = json.loads((world_dir / "rm_val.jsonl").read_text().splitlines()[0]).get("labeler", "")
    ppo_cfg = yaml.safe_load((ppo_dir / "config.yaml").read_text())
    steps = [json.loads(x)["step"] for x in (ppo_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    episode = ppo_episode(ppo_dir / "policy", sft_dir, rm_dir, read_prompts(world_dir / "ppo_val.jsonl")[0],
                          float(ppo_cfg["kl_coef"]), int(ppo_cfg["max_new_tokens"]))
    out = {"sft": {"stage": "sft-small", "prompt": demo.prompt, "completion": demo.completion},
           "ranking": {"prompt": ranked.prompt, "responses": list(ranked.responses),
                       "ranking": [list(g) if len(g) > 1 else g[0] for g in ranked.groups],
                       "rm_scores": [round(s, 4) for s in scores],
                       "gold": [round(world.judge(ranked.prompt, r).quality, 4) for r in ranked.responses],
                       "labeler": labeler},
           "ppo_step": {"stage": ppo_dir.name, "step": max(steps), **episode}}
    write_json(root / "walkthrough.json", out)
    return out
