"""Stage 0: pretrain a GPT-shaped `transformers` model on the lab world's web corpus.

(Lab world only: any local Hugging Face causal LM can replace this stage.) Documents
are laid out as [bos] text [eos] and packed into one token stream; each step reads
random windows of it. The result knows the world but continues instructions the way
the web does: the misalignment the later stages fix.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from rlhflab import distributed
from rlhflab.adapters import checkpoint_activations
from rlhflab.config import RunFields, TrainFields, add_config_arguments, check, config_from_args, train_fields
from rlhflab.data import read_texts
from rlhflab.device import autocast, fast_kernels
from rlhflab.errors import InputError
from rlhflab.models import LAB_SIZES, lab_model, load_tokenizer, n_params
from rlhflab.text import train_tokenizer
from rlhflab.training import Loop, fit, resolve_device, set_seed, write_outputs


@dataclass
class PretrainConfig:
    world: str = ""
    """Lab world directory (from `rlhflab world`); supplies corpus, tokenizer and the gold check."""
    corpus: str = ""
    """Pretraining text ({"text"} JSONL or .txt); default: <world>/corpus_train.jsonl."""
    val_corpus: str = ""
    """Held-out text for the loss; default: <world>/corpus_val.jsonl."""
    tokenizer: str = ""
    """Tokenizer directory; default: <world>/tokenizer, else one is trained on the corpus."""
    vocab_size: int = 1024
    """BPE vocabulary size when a tokenizer is trained here."""
    size: Literal["small", "large"] = "small"
    """Model preset: 'small' (~0.2M params) or 'large' (~2M params, ~10x)."""
    out_dir: str = "runs/pretrain"
    """Output directory (model, tokenizer, metrics.jsonl, config.yaml, summary.json)."""
    steps: int = 1500
    """Optimizer steps (one pass of random windows: pretraining has no epochs)."""
    batch_size: int = 32
    """Windows per step."""
    seq_len: int = 128
    """Tokens per window (also the model's context length)."""
    train: TrainFields = train_fields(lr=3e-3, save_every=500)
    """Optimisation: lr 3e-3 (tiny models take a large one), gradient clip 1.0."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    final_lr_ratio: float = 0.1
    """Cosine decay ends at this fraction of the peak."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    eval_every: int = 250
    """Steps between held-out loss evaluations."""
    gold_prompts: int = 100
    """Held-out lab instructions answered greedily at the end to measure gold quality (0: skip)."""
    run: RunFields = field(default_factory=RunFields)
    """Seed (initialisation, data order) and device. Held-out loss and the gold check run in
    fp32 whatever train.precision says."""

    def validate(self):
        check(self.steps > 0, "steps", self.steps, "must be positive")
        check(self.batch_size > 0, "batch_size", self.batch_size, "must be positive")
        check(16 <= self.seq_len <= 4096, "seq_len", self.seq_len, "must be in 16..4096")
        check(self.train.lr > 0, "train.lr", self.train.lr, "must be positive")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        check(0 <= self.final_lr_ratio <= 1, "final_lr_ratio", self.final_lr_ratio, "must be in [0, 1]")
        check(self.vocab_size >= 300, "vocab_size", self.vocab_size, "must be at least 300")
        check(self.size in LAB_SIZES, "size", self.size, f"must be one of {list(LAB_SIZES)}")


def _paths(cfg: PretrainConfig) -> tuple[Path, Path | None, Path | None]:
    world = Path(cfg.world) if cfg.world else None
    corpus = Path(cfg.corpus) if cfg.corpus else world / "corpus_train.jsonl"
    val = Path(cfg.val_corpus) if cfg.val_corpus else (world / "corpus_val.jsonl" if world else None)
    tok = Path(cfg.tokenizer) if cfg.tokenizer else (world / "tokenizer" if world else None)
    return corpus, val, tok


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """[bos] text [eos] for every document, concatenated.  (N,)"""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out = []
    for doc in ids:
        out.append(tokenizer.bos_token_id)
        out.extend(doc)
        out.append(tokenizer.eos_token_id)
    return torch.tensor(out, dtype=torch.long)


def windows(stream: torch.Tensor, batch: int, seq_len: int, seed: int, step: int) -> torch.Tensor:
    """Random windows for `step`, a pure function of (seed, step) so resume is exact.  (B, T)"""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - seq_len, (batch,), generator=g)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def eval_loss(model, stream: torch.Tensor, seq_len: int, max_windows: int = 64) -> float:
    device = next(model.parameters()).device
    model.eval()
    n = min(max_windows, max(1, (len(stream) - 1) // seq_len))
    total, count = 0.0, 0
    for i in range(0, n, 16):
        x = torch.stack([stream[j * seq_len : (j + 1) * seq_len] for j in range(i, min(n, i + 16))])
        x = x.to(device)
        total += float(model(input_ids=x, labels=x).loss) * x.numel()
        count += x.numel()
    model.train()
    return total / count


def unigram_loss(train: torch.Tensor, val: torch.Tensor, vocab: int) -> float:
    """Cross-entropy (nats/token) of the add-one unigram model: the baseline to beat."""
    counts = Counter(train.tolist())
    total = len(train) + vocab
    return -sum(math.log((counts.get(t, 0) + 1) / total) for t in val.tolist()) / len(val)


def train(cfg: PretrainConfig, callback=None) -> tuple[Path, dict]:
    """Pretrain a fresh lab model on the corpus; returns (<out_dir>/model, summary).
    `callback(step, row)` runs after every optimizer step (tests simulate a kill with it)."""
    check(bool(cfg.world or cfg.corpus), "corpus", cfg.corpus, "give a corpus or a lab world")
    corpus_path, val_path, tok_path = _paths(cfg)
    texts = read_texts(corpus_path)  # validated before anything is written
    val_texts = read_texts(val_path) if val_path else texts[-max(1, len(texts) // 50) :]
    out = Path(cfg.out_dir)
    tokenizer = load_tokenizer(tok_path) if tok_path and tok_path.exists() else train_tokenizer(texts, cfg.vocab_size)
    stream, val_stream = token_stream(tokenizer, texts), token_stream(tokenizer, val_texts)
    if len(stream) <= cfg.seq_len or len(val_stream) <= cfg.seq_len:
        raise InputError(f"corpus too short for seq_len {cfg.seq_len}", file=str(corpus_path))

    dist = distributed.setup(resolve_device(cfg.run.device))  # one process, or this rank of torchrun's
    device = dist.device
    set_seed(cfg.run.seed)
    model = lab_model(cfg.size, tokenizer, n_positions=cfg.seq_len, seed=cfg.run.seed)  # the same on every rank
    fast_kernels(model.to(device).train(), device, cfg.train.precision)
    if cfg.train.gradient_checkpointing:
        checkpoint_activations(model)
    trained = distributed.wrap(model, cfg.train.parallel, dist)  # model itself in one process

    tokens = [0]  # trained in this process (a resumed run counts from its checkpoint)

    def loss(step_windows: torch.Tensor, scale: float) -> tuple[torch.Tensor, dict]:
        x = step_windows.to(device)  # this rank's windows of the step's batch
        tokens[0] += x.numel() if scale > 0 else 0
        with autocast(device, cfg.train.precision):
            value = trained(input_ids=x, labels=x, use_cache=False).loss
        (value * scale).backward()
        return value.detach(), {}

    def held_out(step: int) -> dict:
        if step % cfg.eval_every and step != cfg.steps:
            return {}
        return {"pretrain/val_loss": round(eval_loss(model, val_stream, cfg.seq_len), 5)}

    t0 = time.time()
    fit(
        model,
        cfg,
        Loop(
            "pretrain",
            epochs=1,
            steps_per_epoch=cfg.steps,
            log_epoch=False,
            batch=lambda _, b: windows(stream, cfg.batch_size, cfg.seq_len, cfg.run.seed, b + 1),
            loss=loss,
            extra=held_out,
        ),
        callback=callback,
        dist=dist,
    )
    elapsed = time.time() - t0
    summary = {
        "params": n_params(model),
        "size": cfg.size,
        "steps": cfg.steps,
        "val_loss": round(eval_loss(model, val_stream, cfg.seq_len), 4),  # every rank, the same windows
        "unigram_loss": round(unigram_loss(stream, val_stream, len(tokenizer)), 4),
        "tokens_per_s": round(dist.sum(tokens[0]) / max(elapsed, 1e-9), 1),
    }
    plain = distributed.full_model(model, dist)  # None on ranks other than 0
    if plain is not None and cfg.world and cfg.gold_prompts:
        from rlhflab.eval.lab import gold_of_policy
        from rlhflab.world import load_world

        world = load_world(cfg.world)
        prompts = [t.prompt for t in world.splits["test"][: cfg.gold_prompts]]
        summary.update({f"base_{k}": v for k, v in gold_of_policy(plain.eval(), tokenizer, world, prompts).items()})
    return write_outputs(out, plain, tokenizer, summary, dist), summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, PretrainConfig)


def run_cli(args) -> int:
    cfg = config_from_args(PretrainConfig, args)
    model_dir, s = train(cfg)
    if not distributed.is_main_process():
        return 0
    gold = f", greedy gold quality on held-out instructions {s['base_gold']:.3f}" if "base_gold" in s else ""
    print(
        f"pretrained {cfg.size} ({s['params']:,} params) -> {model_dir}: held-out loss {s['val_loss']:.3f} "
        f"vs unigram {s['unigram_loss']:.3f} nats/token{gold}"
    )
    return 0
