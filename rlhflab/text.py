"""How a (prompt, response) pair becomes tokens, the same way in every stage.

query    = [bos] + tokens(prompt + SEP)
response = tokens(completion) + [eos]
Every stage (SFT, sampling, RM, PPO, eval) goes through these two functions so that a
model never sees one layout in training and another in use.
"""
from __future__ import annotations

import torch

SEP = "\n"
"""Text between the prompt and the response."""


def encode_query(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt + SEP, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids)


def encode_response(tokenizer, completion: str, eos: bool = True) -> list[int]:
    ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    return ids + ([tokenizer.eos_token_id] if eos else [])


def decode_response(tokenizer, ids) -> str:
    """Text of a generated response: stops at the first eos, drops padding."""
    ids = [int(i) for i in ids]
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    ids = [i for i in ids if i != tokenizer.pad_token_id]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists (for generation).  -> ids (B, T), attention_mask (B, T)"""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.tensor(s)
            mask[i, T - len(s):] = 1
    return ids, mask


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists (for training).  -> ids (B, T), attention_mask (B, T)"""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask
