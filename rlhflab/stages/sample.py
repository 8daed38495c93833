"""K samples per prompt from a policy, written as JSONL ready to be ranked (§3.5).

The paper's labelers ranked K = 4 to 9 outputs per prompt; K is drawn per prompt from a
seeded generator. All prompts x K samples go through `generation.generate` in chunks of
batch_size with the KV cache, each chunk with its own generator seeded from (run.seed,
pass, chunk). Output rows: {"prompt": str, "responses": [str, ...]}.

    torchrun --nproc_per_node 4 -m rlhflab sample --config sample.yaml

Under torchrun each rank generates its block of the chunks and rank 0 writes the file,
in the prompts' order: the same file as one process writes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhflab import distributed
from rlhflab.config import RunFields, add_config_arguments, check, config_from_args
from rlhflab.data import MAX_K, prompt_json, read_prompt_rows, read_prompts
from rlhflab.errors import InputError, TrainingError
from rlhflab.generation import generate, generator_for
from rlhflab.io import write_jsonl
from rlhflab.models import context_length, load_causal_lm, load_tokenizer
from rlhflab.text import encode_query
from rlhflab.training import progress, resolve_device


@dataclass
class SampleConfig:
    policy: str = ""
    """Policy directory (a causal LM, e.g. the SFT output)."""
    prompts: str = ""
    """Prompts JSONL, rows {"prompt"}."""
    out: str = "runs/samples.jsonl"
    """Output JSONL: one {"prompt", "responses"} row per prompt, written atomically."""
    k_min: int = 4
    """Fewest samples per prompt (the paper: K = 4 to 9)."""
    k_max: int = 9
    """Most samples per prompt; K is drawn uniformly in [k_min, k_max] for each prompt."""
    temperature: float = 1.0
    """Sampling temperature."""
    max_new_tokens: int = 64
    """Longest response; one cut there has no eos (it is still written)."""
    batch_size: int = 64
    """Sequences per generation batch (prompts x K are flattened, then cut into chunks of
    this many, each sampled with its own seed: the output does not depend on the number
    of processes)."""
    retries: int = 4
    """Resample an empty response up to this many times; still empty, it is dropped."""
    run: RunFields = field(default_factory=RunFields)
    """Seed (K per prompt and the samples) and device."""

    def validate(self) -> None:
        check(bool(self.policy), "policy", self.policy, "a policy directory is required")
        check(bool(self.prompts), "prompts", self.prompts, "a prompts JSONL file is required")
        check(bool(self.out), "out", self.out, "required")
        check(2 <= self.k_min <= self.k_max, "k_min", self.k_min, "need 2 <= k_min <= k_max")
        check(self.k_max <= MAX_K, "k_max", self.k_max, f"must be <= {MAX_K}")
        check(self.temperature > 0, "temperature", self.temperature, "must be > 0")
        check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        check(self.retries >= 0, "retries", self.retries, "must be >= 0")


def check_prompt_lengths(tokenizer, path: str, max_len: int | None, max_new_tokens: int) -> list[list[int]]:
    """The query ids of every prompt in `path`, refusing one whose query + max_new_tokens
    does not fit the context (file:line), or a conversation the tokenizer cannot render."""
    queries = []
    for line, prompt in read_prompt_rows(path):
        q = encode_query(tokenizer, prompt, dict(file=path, line=line, field="prompt"))
        queries.append(q)
        n = len(q)
        if max_len is not None and n + max_new_tokens > max_len:
            raise InputError(
                f"prompt is {n} tokens; with max_new_tokens={max_new_tokens} that "
                f"exceeds the model's context of {max_len}",
                file=path,
                line=line,
                field="prompt",
            )
    return queries


def run(config: SampleConfig) -> tuple[Path, dict]:
    """Sample K responses per prompt; returns (output path, metrics). Under torchrun every
    rank returns the same metrics once rank 0 has written the file."""
    config.validate()
    t0 = time.time()
    tokenizer = load_tokenizer(config.policy)
    prompts = read_prompts(config.prompts)
    model = load_causal_lm(config.policy)
    queries = check_prompt_lengths(tokenizer, config.prompts, context_length(model.config), config.max_new_tokens)
    dist = distributed.setup(resolve_device(config.run.device))  # one process, or this rank of torchrun's
    model.to(dist.device)

    k_gen = torch.Generator().manual_seed(config.run.seed)
    ks = torch.randint(config.k_min, config.k_max + 1, (len(prompts),), generator=k_gen).tolist()
    owners = [i for i, k in enumerate(ks) for _ in range(k)]  # prompts x K, flattened
    texts, ended = sample_chunks(model, tokenizer, [queries[i] for i in owners], config, dist, 0)
    for attempt in range(1, config.retries + 1):  # labelers cannot rank an empty answer (data.py refuses it)
        empty = [j for j, t in enumerate(texts) if not t.strip()]
        if not empty:
            break
        redo = sample_chunks(model, tokenizer, [queries[owners[j]] for j in empty], config, dist, attempt)
        for j, t, e in zip(empty, *redo):
            texts[j], ended[j] = t, e

    rows = [{"prompt": prompt_json(p), "responses": []} for p in prompts]
    for owner, text in zip(owners, texts):
        if text.strip():
            rows[owner]["responses"].append(text)
    kept = [r for r in rows if len(r["responses"]) >= 2]
    if not kept:
        raise TrainingError("no prompt got two non-empty responses; nothing to rank (raise max_new_tokens or retries?)")
    n = write_jsonl(Path(config.out), kept) if dist.is_main else len(kept)
    dist.barrier()
    metrics = {
        "sample/prompts": n,
        "sample/dropped_prompts": len(rows) - n,
        "sample/responses": sum(len(r["responses"]) for r in kept),
        "sample/dropped_empty": sum(not t.strip() for t in texts),
        "sample/truncated_frac": 1 - sum(ended) / len(ended),
        "sample/mean_chars": sum(map(len, texts)) / len(texts),
        "sample/seconds": round(time.time() - t0, 1),
    }
    return Path(config.out), metrics


def sample_chunks(
    model, tokenizer, queries: list[list[int]], config: SampleConfig, dist, attempt: int
) -> tuple[list[str], list[bool]]:
    """(texts, ended) of one response per query, in order, on every rank. The queries are
    cut into chunks of batch_size; chunk c of pass `attempt` (0, then each retry) samples
    with the generator of `chunk_seed`, so which process runs it changes nothing; each
    rank runs its block of chunks (distributed.map_shards)."""
    size = config.batch_size
    chunks = list(range(math.ceil(len(queries) / size)))

    def run_chunks(part: list[int]) -> list[tuple[list[str], list[bool]]]:
        out = []
        bar = progress(part, total=len(part), desc="sample", show=dist.is_main and attempt == 0)
        for c in bar:
            gen = generator_for(model, chunk_seed(config.run.seed, attempt, c))
            r = generate(
                model,
                tokenizer,
                queries[c * size : (c + 1) * size],
                max_new_tokens=config.max_new_tokens,
                temperature=config.temperature,
                batch_size=size,
                generator=gen,
            )
            out.append((r.texts, r.ended))
        return out

    results = dist.map_shards(run_chunks, chunks)
    return [t for texts, _ in results for t in texts], [e for _, ended in results for e in ended]


def chunk_seed(seed: int, attempt: int, chunk: int) -> int:
    """The generator seed of a chunk; the first pass's first chunk has run.seed + 1."""
    return (seed + 1 + 7_919 * attempt + 1_000_033 * chunk) % (2**63)


def add_arguments(parser) -> None:
    add_config_arguments(parser, SampleConfig)


def run_cli(args) -> int:
    config = config_from_args(SampleConfig, args)
    out, metrics = run(config)
    if not distributed.setup(resolve_device(config.run.device)).is_main:  # torchrun: rank 0 reports
        return 0
    print(f"sample: wrote {metrics['sample/responses']} responses for {metrics['sample/prompts']} prompts to {out}")
    return 0
