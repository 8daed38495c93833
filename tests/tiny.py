"""Tiny models and data built from config for tests: no download, a second or two on a CPU.

    tok = tiny_tokenizer()
    gpt2 = gpt2_dir(tmp_path / "gpt2", tok)     # GPT-2-shaped (rlhflab's lab model)
    llama = llama_dir(tmp_path / "llama", tok)  # Llama-shaped (RoPE, RMSNorm, GQA)
Both directories hold a `save_pretrained` model plus the tokenizer, like any stage output.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

from rlhflab.config import RunFields, TrainFields
from rlhflab.models import lab_model
from rlhflab.text import train_tokenizer

WORDS = (
    "the cat sat on the mat . a dog ran far away . name a color : red blue green . "
    "summarize this : birds fly south in winter . yes no maybe . one two three four"
)

_TOKENIZER = None


def tiny_tokenizer():
    """A byte-level BPE (pad, bos, eos distinct) trained on a few sentences; cached."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = train_tokenizer([WORDS] * 4, vocab_size=320)
    return _TOKENIZER


def gpt2_dir(path: Path, tok=None, n_positions: int = 128, seed: int = 0) -> Path:
    tok = tok or tiny_tokenizer()
    model = lab_model("small", tok, n_positions=n_positions, seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def llama_dir(path: Path, tok=None, max_positions: int = 128, seed: int = 0) -> Path:
    import torch

    tok = tok or tiny_tokenizer()
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def manifest(*roots: Path) -> dict[str, str]:
    """relative path -> sha256 for every file (hidden ones too), '<dir>' for directories."""
    import hashlib

    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            key = f"{root.name}/{p.relative_to(root)}"
            out[key] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return Path(path)


def demo_rows(n: int = 12) -> list[dict]:
    """Demonstrations with a learnable pattern: the answer repeats the prompt's last word."""
    words = "cat dog mat red blue green one two three four yes no".split()
    return [{"prompt": f"say {words[i % len(words)]}", "completion": f"{words[i % len(words)]} ."} for i in range(n)]


def ranking_rows(n: int = 8, k: int = 4) -> list[dict]:
    """Rankings where the longer response is better (something an RM can learn quickly)."""
    rows = []
    for i in range(n):
        responses = [" ".join(["red"] * (j + 1)) for j in range(k)]
        rows.append({"prompt": f"name a color {i}", "responses": responses, "ranking": list(range(k - 1, -1, -1))})
    return rows


RUN_KEYS = {f.name for f in dataclasses.fields(RunFields)}
TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainFields)}


def make(cls, **kw):
    """A stage config from flat keyword arguments, as tests write them: seed and device go
    to its `run` block, lr, max_grad_norm, save_every and precision to its `train` block."""
    default = cls()
    run = {k: kw.pop(k) for k in list(kw) if k in RUN_KEYS}
    train = {k: kw.pop(k) for k in list(kw) if k in TRAIN_KEYS}
    if run:
        kw["run"] = dataclasses.replace(default.run, **run)
    if train:
        kw["train"] = dataclasses.replace(default.train, **train)
    return cls(**kw)


def dotted(key: str) -> str:
    """The command-line key of a flat test key: 'lr' -> 'train.lr', 'seed' -> 'run.seed'."""
    return f"run.{key}" if key in RUN_KEYS else f"train.{key}" if key in TRAIN_KEYS else key
