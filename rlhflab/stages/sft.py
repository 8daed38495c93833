"""Stage 1: supervised fine-tuning on demonstrations (§3.5 "Supervised fine-tuning").

    demos ──tokens (text.py layout)──▶ right-padded batches, labels on the response only
          ──AdamW, cosine to 10%, residual dropout──▶ one checkpoint per epoch
          ──pick the epoch (RM score on val prompts / val loss / last)──▶ out_dir

The base is rlhflab's pretrained model or any local Hugging Face causal LM directory.
`out_dir` gets config.yaml and metrics.jsonl as training goes, `model/` (save_pretrained:
safetensors + tokenizer) at the end and then summary.json, the mark of a finished stage.
While training it holds `checkpoint/` (and `best/`), and a rerun resumes from there.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_model
from transformers import AutoConfig

from rlhflab import distributed
from rlhflab.adapters import checkpoint_activations
from rlhflab.config import (
    RunFields,
    TrainFields,
    add_config_arguments,
    check,
    config_from_args,
    train_fields,
    validate,
)
from rlhflab.data import read_demos, read_prompt_rows, read_texts
from rlhflab.device import autocast, fast_kernels
from rlhflab.errors import InputError
from rlhflab.generation import generate, generator_for
from rlhflab.io import atomic_dir
from rlhflab.models import context_length, load_causal_lm, load_reward_model, load_tokenizer, token_logprobs
from rlhflab.stages.rm_score import score_pairs
from rlhflab.stages.sample import check_prompt_lengths
from rlhflab.text import assistant_spans, encode_documents, encode_pair, encode_query, pad_right
from rlhflab.training import Loop, fit, resolve_device, set_seed, shuffled_batch, write_outputs

IGNORE = -100
"""Label of positions that carry no loss (prompt and padding)."""

# Dropout fields by architecture: GPT-2 (resid/embd/attn_pdrop), Llama/Mistral/Qwen
# (attention_dropout: they have no residual dropout), OPT/BLOOM-style (dropout, hidden_dropout).
DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout", "dropout")


@dataclass
class SFTConfig:
    base: str = ""
    """Base causal LM directory: rlhflab's pretrained model or any local Hugging Face causal LM."""
    data: str = ""
    """Demonstrations: JSONL, parquet or a save_to_disk directory of {"prompt", "completion"}
    strings, or conversations ({"messages"} or conversational prompt/completion, rendered
    with the tokenizer's chat template)."""
    assistant_turns: str = "last"
    """Which assistant turns of a conversation carry the loss: 'last' (the answer to the
    prompt) or 'all' (every assistant turn; system and user turns never do)."""
    out_dir: str = "runs/sft"
    """Output directory: model/ (HF model + tokenizer), metrics.jsonl, config.yaml,
    summary.json."""
    val_data: str | None = None
    """Held-out demonstrations: validation loss every epoch; picks the epoch if no reward model."""
    ptx_data: str | None = None
    """Pretraining texts (JSONL {"text"}) mixed into the demonstrations, the loss on every
    token (App. C.3: the RL policies start from a model fine-tuned 2 epochs on demonstrations
    'with 10% pretraining data mixed in'). None: demonstrations only (§3.5's SFT)."""
    ptx_fraction: float = 0.1
    """The pretraining texts' share of the labelled tokens, so of the loss (App. C.3: 10%).
    Texts are drawn in a seeded order until they reach it; the same texts every epoch."""
    reward_model: str | None = None
    """Reward model directory: keep the epoch whose samples on val_prompts score best
    (§3.5, App. C.1)."""
    val_prompts: str | None = None
    """Prompts JSONL sampled after each epoch for the reward-model choice (needs reward_model)."""
    epochs: int = 16
    """Passes over the demonstrations (§3.5: 16; val loss overfits after one epoch, yet
    RM score and human preference keep improving)."""
    train: TrainFields = train_fields(lr=1e-3, save_every=200)
    """Optimisation. lr: App. C.1 used 9.65e-6 for 1.3B/6B; the lab's ~0.2M-parameter model
    needs far larger steps (on the lab world 1e-3 beat 3e-4: val loss 0.45 vs 0.58, gold
    0.57 vs 0.42). Lower it for larger models. Gradient clip 1.0."""
    final_lr_ratio: float = 0.1
    """Cosine decay ends at this fraction of the peak (App. C.1: 10%)."""
    warmup_steps: int = 0
    """Linear warm-up steps (App. C.1: none)."""
    batch_size: int = 8
    """Demonstrations per optimizer step (App. C.1: 32 for 1.3B/6B, 8 for 175B)."""
    dropout: float = 0.2
    """Residual dropout while training (§3.5: 0.2). Set on every dropout field the
    architecture has (GPT-2: resid/embd/attn_pdrop; Llama: attention_dropout only); the saved
    model keeps the base's values so later stages sample without dropout."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    val_max_new_tokens: int = 64
    """Length of the samples scored by the reward model after each epoch."""
    val_temperature: float = 1.0
    """Sampling temperature for those samples (the same seed every epoch, for a fair comparison)."""
    eval_batch_size: int = 32
    """Sequences per forward when sampling, scoring and computing val loss."""
    run: RunFields = field(default_factory=RunFields)
    """Seed (initialisation, dropout, data order, the RM-choice samples) and device."""

    def validate(self) -> None:
        check(bool(self.base), "base", self.base, "a base model directory is required")
        check(bool(self.data), "data", self.data, "a demonstrations JSONL file is required")
        check(bool(self.out_dir), "out_dir", self.out_dir, "required")
        check(
            (self.reward_model is None) == (self.val_prompts is None),
            "val_prompts",
            self.val_prompts,
            "reward_model and val_prompts go together",
        )
        check(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        check(0 < self.ptx_fraction < 1, "ptx_fraction", self.ptx_fraction, "must be in (0, 1)")
        check(self.assistant_turns in ("last", "all"), "assistant_turns", self.assistant_turns, "must be last or all")
        check(self.train.lr > 0, "train.lr", self.train.lr, "must be > 0")
        check(0 <= self.final_lr_ratio <= 1, "final_lr_ratio", self.final_lr_ratio, "must be in [0, 1]")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        check(0 <= self.dropout < 1, "dropout", self.dropout, "must be in [0, 1)")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        check(self.val_max_new_tokens >= 1, "val_max_new_tokens", self.val_max_new_tokens, "must be >= 1")
        check(self.val_temperature > 0, "val_temperature", self.val_temperature, "must be > 0")
        check(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "must be >= 1")


# --------------------------------------------------------------------------- data


Example = tuple[list[int], list[tuple[int, int]]]
"""One demonstration's token ids and the [start, end) spans that carry the loss."""


def example(query: list[int], response: list[int]) -> Example:
    """A (query, response) pair as an Example: the loss on the response."""
    return query + response, [(len(query), len(query) + len(response))]


def encode_demos(tokenizer, path: str, max_len: int | None, assistant_turns: str = "last") -> list[Example]:
    """Token ids and loss spans per demonstration, refusing any that does not fit the context.

    String rows: the loss is on the completion (and its eos). Conversations: on the last
    assistant turn, or on every assistant turn with assistant_turns='all' (text.assistant_spans).
    """
    examples = []
    for demo in read_demos(path):
        where = dict(file=path, line=demo.line, field="messages" if demo.conversation else "prompt")
        if demo.conversation is None:
            ids, spans = example(*encode_pair(tokenizer, demo.prompt, demo.completion))  # eos is a label
        else:
            ids, spans = assistant_spans(tokenizer, demo.conversation, where)
            if assistant_turns == "last":
                spans = spans[-1:]
        if max_len is not None and spans[0][0] >= max_len:
            raise InputError(f"prompt is {spans[0][0]} tokens, the model's context is {max_len}", **where)
        if max_len is not None and len(ids) > max_len:
            raise InputError(
                f"prompt + completion is {len(ids)} tokens, the model's context is {max_len}",
                **dict(where, field="messages" if demo.conversation else "completion"),
            )
        examples.append((ids, spans))
    return examples


def pretraining_examples(tokenizer, path: str, max_len: int | None, demos: list[Example], fraction: float, seed: int):
    """Pretraining texts as Examples (the loss on every token but the first), drawn in a
    seeded order until their labelled tokens are `fraction` of the mix with `demos`."""
    texts = read_texts(path)
    want = fraction / (1 - fraction) * n_labelled(demos)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    out, have = [], 0
    for i in order:
        if have >= want:
            break
        ids = encode_documents(tokenizer, [texts[i]], max_len)[0]
        out.append((ids, [(1, len(ids))]))
        have += len(ids) - 1
    return out


def sft_batch(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 outside the loss spans).  (B, T)"""
    ids, mask = pad_right([e for e, _ in examples], pad_id)
    labels = torch.full_like(ids, IGNORE)
    for i, (_, spans) in enumerate(examples):
        for start, end in spans:
            labels[i, start:end] = ids[i, start:end]
    return ids, mask, labels


def n_labelled(examples: list[Example]) -> int:
    return sum(end - start for _, spans in examples for start, end in spans)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over labelled (response) tokens.  logits (B, T, V), labels (B, T)

    Through `token_logprobs`: no fp32 copy of the full-vocabulary logits is kept for the
    backward (the bulk of an SFT step's memory on a GPU at a 50k vocabulary).
    """
    # Position t predicts token t+1; prompt and padding labels are -100 and carry no loss.
    target = labels[:, 1:]
    labelled = target != IGNORE
    return -token_logprobs(logits[:, :-1], target.clamp(min=0))[labelled].mean()


def forward_loss(model, examples, pad_id: int, device) -> torch.Tensor:
    ids, mask, labels = (t.to(device) for t in sft_batch(examples, pad_id))
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return sft_loss(logits, labels)


# --------------------------------------------------------------------------- model


def load_policy(path: str, dropout: float) -> tuple[torch.nn.Module, dict[str, float]]:
    """The base LM with every dropout field it has set to `dropout`; also the original values."""
    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot read the model config: {str(e).splitlines()[0]}", file=path) from None
    original = {
        k: getattr(cfg, k) for k in DROPOUT_KEYS if type(getattr(cfg, k, None)) in (int, float)
    }  # a probability, not a flag
    model = load_causal_lm(path, **{k: dropout for k in original})
    return model, original


@torch.no_grad()
def val_loss(model, examples, pad_id: int, batch_size: int, device, dist=distributed.SINGLE) -> float:
    """Token-weighted response NLL on held-out demonstrations (dropout off); with `dist`,
    the batches shared out over the ranks and the result the same on every rank."""
    was_training = model.training
    model.eval()
    chunks = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]

    def nll(part: list) -> list[tuple[float, int]]:  # (summed NLL, labelled tokens) per batch
        return [(float(forward_loss(model, c, pad_id, device)) * n_labelled(c), n_labelled(c)) for c in part]

    total, count = 0.0, 0
    for t, n in dist.map_shards(nll, chunks):
        total += t
        count += n
    model.train(was_training)
    return total / count


def rm_score(model, tokenizer, prompts, rm, rm_tokenizer, config: SFTConfig) -> float:
    """Mean reward of the policy's samples on the val prompts (App. C.1 model selection)."""
    texts = generate(
        model,
        tokenizer,
        [encode_query(tokenizer, p) for p in prompts],
        temperature=config.val_temperature,
        max_new_tokens=config.val_max_new_tokens,
        batch_size=config.eval_batch_size,
        generator=generator_for(model, config.run.seed),  # the same draws every epoch
    ).texts
    scores = score_pairs(rm, rm_tokenizer, prompts, texts, config.eval_batch_size)
    return sum(scores) / len(scores)


# --------------------------------------------------------------------------- train


@dataclass
class _Inputs:
    """Everything `train` reads, loaded and checked before anything is written."""

    tokenizer: object
    model: torch.nn.Module
    base_dropout: dict
    train_set: list
    val_set: list | None
    prompts: list | None
    rm: torch.nn.Module | None
    rm_tokenizer: object | None
    ptx_texts: int = 0
    """Pretraining texts at the end of train_set (App. C.3's mix)."""


def read_inputs(config: SFTConfig) -> _Inputs:
    tokenizer = load_tokenizer(config.base)
    if tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no eos token (SFT teaches the model to stop)", file=config.base)
    model, base_dropout = load_policy(config.base, config.dropout)
    max_len = context_length(model.config)
    train_set = encode_demos(tokenizer, config.data, max_len, config.assistant_turns)
    val_set = encode_demos(tokenizer, config.val_data, max_len, config.assistant_turns) if config.val_data else None
    ptx = []
    if config.ptx_data:
        ptx = pretraining_examples(tokenizer, config.ptx_data, max_len, train_set, config.ptx_fraction, config.run.seed)
    prompts, rm, rm_tokenizer = None, None, None
    if config.reward_model:
        prompts = [p for _, p in read_prompt_rows(config.val_prompts)]
        n = config.val_max_new_tokens
        check_prompt_lengths(tokenizer, config.val_prompts, max_len, n)
        rm_tokenizer = load_tokenizer(config.reward_model)
        rm = load_reward_model(config.reward_model).eval().requires_grad_(False)
        check_prompt_lengths(rm_tokenizer, config.val_prompts, context_length(rm.config), n + 1)
    return _Inputs(tokenizer, model, base_dropout, train_set + ptx, val_set, prompts, rm, rm_tokenizer, len(ptx))


def train(config: SFTConfig, callback=None) -> tuple[Path, dict]:
    """Fine-tune `config.base` on `config.data`; returns (<out_dir>/model, summary).

    `callback(step, row)` runs after every optimizer step (tests raise from it to
    simulate an interruption).
    """
    validate(config)
    out_dir, t0 = Path(config.out_dir), time.time()
    # 1. Read and check every input before anything is written.
    inp = read_inputs(config)
    model, tokenizer, train_set = inp.model, inp.tokenizer, inp.train_set
    dist = distributed.setup(resolve_device(config.run.device))  # one process, or this rank of torchrun's
    device = dist.device
    set_seed(config.run.seed)
    fast_kernels(model.to(device).train(), device, config.train.precision)
    if config.train.gradient_checkpointing:
        checkpoint_activations(model)
    if inp.rm is not None:
        inp.rm.to(device)
    trained = distributed.wrap(model, config.train.parallel, dist)  # model itself in one process

    def loss(examples, scale: float) -> tuple[torch.Tensor, dict]:
        with autocast(device, config.train.precision):
            value = forward_loss(trained, examples, tokenizer.pad_token_id, device)
        (value * scale).backward()
        return value.detach(), {}

    # 2-4. Epochs of response-only next-token loss (resumable); after each, evaluate and
    # remember the best epoch's weights.
    n, bs = len(train_set), config.batch_size
    state, _ = fit(
        model,
        config,
        Loop(
            "sft",
            epochs=config.epochs,
            steps_per_epoch=math.ceil(n / bs),
            loss=loss,
            weight=n_labelled,  # the loss is a mean over labelled tokens
            batch=lambda e, b: [train_set[i] for i in shuffled_batch(n, bs, config.run.seed, e, b)],
            end_of_epoch=lambda e, st: _end_of_epoch(inp, config, st, e, device, out_dir, dist),
        ),
        extra_state={"best": None},
        callback=callback,
        dist=dist,
    )

    # 5. Load the chosen epoch; write <out_dir>/model atomically, then summary.json (rank 0).
    plain = distributed.full_model(model, dist)  # None on ranks other than 0
    if plain is not None:
        if (out_dir / "best" / "model.safetensors").is_file():
            load_model(plain, str(out_dir / "best" / "model.safetensors"), strict=False)
        for key, value in inp.base_dropout.items():
            setattr(plain.config, key, value)  # sample/RM/PPO see the base's dropout, not SFT's
    summary = _summary(config, state, inp, time.time() - t0)
    return write_outputs(out_dir, plain, tokenizer, summary, dist), summary


def _end_of_epoch(inp: _Inputs, config: SFTConfig, state: dict, epoch: int, device, out_dir: Path, dist) -> dict:
    record = {"epoch": epoch + 1}
    if inp.val_set is not None:
        record["val_loss"] = val_loss(
            inp.model, inp.val_set, inp.tokenizer.pad_token_id, config.eval_batch_size, device, dist
        )
    if inp.rm is not None:
        # Every rank samples every prompt, the same draws: FSDP's forwards stay in step.
        record["val_score"] = rm_score(inp.model, inp.tokenizer, inp.prompts, inp.rm, inp.rm_tokenizer, config)
    record = dist.broadcast(record)  # rank 0's numbers: every rank keeps the same epoch
    # §3.5 / App. C.1: the RM score on validation prompts chooses the SFT epoch; else val loss.
    if inp.rm is not None:
        key, sign = "val_score", 1.0
    elif inp.val_set is not None:
        key, sign = "val_loss", -1.0
    else:
        key = None  # keep the last epoch
    best = state["best"]
    if key is not None and (best is None or sign * record[key] > sign * best[key]):
        state["best"] = record
        _save_best(inp.model, out_dir, dist)
    state["epochs"].append(record)
    return {f"sft/{k}": v for k, v in record.items()}


def _save_best(model, out_dir: Path, dist) -> None:
    """best/model.safetensors with the full weights (under FSDP gathered by every rank),
    written by rank 0."""
    if not dist.is_main:
        distributed.save_weights(model, None, dist)  # its part of the gather
        return
    with atomic_dir(out_dir / "best") as tmp:
        distributed.save_weights(model, tmp / "model.safetensors", dist)


def _summary(config: SFTConfig, state: dict, inp: _Inputs, seconds: float) -> dict:
    best = state["best"]
    selected = "reward_model" if config.reward_model else "val_loss" if config.val_data else "last"
    return {
        "stage": "sft",
        "base": config.base,
        "examples": len(inp.train_set) - inp.ptx_texts,
        "ptx_texts": inp.ptx_texts,
        "steps": state["step"],
        "epochs": state["epochs"],
        "best_epoch": best["epoch"] if best else config.epochs,
        "selected_by": selected,
        "dropout_fields": sorted(inp.base_dropout),
        "seconds": round(seconds, 1),
    }


# --------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    add_config_arguments(parser, SFTConfig)


def run_cli(args) -> int:
    config = config_from_args(SFTConfig, args)
    out_dir, summary = train(config)
    if not distributed.is_main_process():
        return 0
    print(
        f"sft: wrote {out_dir} (epoch {summary['best_epoch']} of {config.epochs}, "
        f"chosen by {summary['selected_by']}, {summary['steps']} steps)"
    )
    return 0
