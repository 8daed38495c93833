"""Stage 2: the reward model, trained on K-wise rankings (§3.5 "Reward modeling").

    SFT model + fresh scalar head ──▶ r_θ(x, y) read at the last real token (eos)
    one prompt's K responses = ONE batch element: K scores, C(K,2) comparisons,
        loss = −1/C(K,2) · Σ_(w,l) log σ(r_θ(x, y_w) − r_θ(x, y_l))      (ties dropped)
    (the K responses packed over one copy of the prompt: text.pack, same scores)
    one epoch, cosine to 10% ──▶ gain: samples of the RL's initial policy score std 1
    ──▶ bias: demonstrations score mean 0 ──▶ <out_dir>/model

Keeping a prompt's comparisons together is the paper's point: treated as separate
examples, each response would be seen K−1 times per epoch and the RM overfits. Scoring and
the gain and bias are rm_score.py's, which every other reader of an RM calls too.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

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
from rlhflab.data import Ranking, read_demos, read_rankings
from rlhflab.device import autocast, fast_kernels
from rlhflab.errors import InputError
from rlhflab.models import (
    context_length,
    hf_pad_token_id,
    load_reward_model,
    load_tokenizer,
    reward_scores,
)
from rlhflab.stages.rm_score import apply_normalization, encode_samples, encode_sequence, normalize, score_sequences
from rlhflab.text import additive_mask, encode_pair, encode_query, pack, pad_right, supports_packing
from rlhflab.training import Loop, fit, resolve_device, set_seed, shuffled_batch, write_outputs


@dataclass
class RMConfig:
    base: str = ""
    """The SFT model directory; its LM head is replaced by a fresh scalar head (§3.5)."""
    rankings: str = ""
    """Training rankings, JSONL {"prompt", "responses", "ranking"} (best first) or
    {"prompt", "chosen", "rejected"} (K = 2)."""
    val_rankings: str | None = None
    """Held-out rankings: val loss and pairwise accuracy after each epoch."""
    demos: str | None = None
    """Demonstrations JSONL {"prompt", "completion"}: the bias makes their mean score 0 (§3.5)."""
    policy_samples: str | None = None
    """Samples of the policy RL starts from, JSONL {"prompt", "responses"} (what `rlhflab
    sample` writes): before the demonstrations' centring, every score is multiplied by a gain
    that gives these responses standard deviation `reward_std`, as openai/lm-human-preferences
    normalises its reward model on samples of the initial policy; then a KL coefficient β
    means the same against any reward model. None: no gain (the scale training left)."""
    reward_std: float = 1.0
    """The standard deviation of the policy samples' scores after the gain."""
    out_dir: str = "runs/rm"
    """Output directory: model/ (HF reward model + tokenizer), metrics.jsonl, config.yaml,
    summary.json."""
    epochs: int = 1
    """Passes over the rankings (App. C.2: one; each response is seen once per epoch)."""
    batch_size: int = 8
    """Prompts per optimizer step; each holds all C(K,2) comparisons of its K responses."""
    micro_batch_size: int = 0
    """Prompts per forward pass, gradients accumulated over the batch (0: the whole batch)."""
    pack: bool = True
    """Train on packed rows: a prompt's K responses over one copy of the prompt, several to a
    row under a 4D attention mask (text.pack), the same scores as one padded row per
    response (False) in fewer token slots. Needs eager or sdpa attention; a model with
    another kind trains on padded rows."""
    pack_width: int = 0
    """Token slots per packed row (0: twice the longest prompt + response of the micro-batch).
    The 4D mask holds rows × width² entries (fp32 for eager attention, bool for sdpa): with
    long sequences, a smaller micro_batch_size keeps it small."""
    train: TrainFields = train_fields(lr=3e-4, save_every=200)
    """Optimisation. lr: App. C.2 used 9e-6 for the 6B RM; the lab's ~0.2M-parameter model
    sees ~200 updates in its one epoch and needs far larger steps (lab world, val accuracy:
    3e-5 0.67, 1e-4 0.72, 3e-4 0.73, 1e-3 0.74). Lower it for larger models. Clip 1.0."""
    final_lr_ratio: float = 0.1
    """Cosine decay ends at this fraction of the peak (App. C.2: cosine schedule)."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    eval_batch_size: int = 32
    """Sequences per forward when scoring (evaluation, demo centring)."""
    train_eval_prompts: int = 500
    """rm/train_accuracy after training is measured on this many training prompts, the first
    of the file (0: all of them; on the lab's 4,000 a full pass cost ~15% of the stage)."""
    run: RunFields = field(default_factory=RunFields)
    """Seed (the head's initialisation, data order) and device."""

    def validate(self) -> None:
        check(bool(self.base), "base", self.base, "the SFT model directory is required")
        check(bool(self.rankings), "rankings", self.rankings, "a rankings JSONL file is required")
        check(bool(self.out_dir), "out_dir", self.out_dir, "required")
        check(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        check(self.micro_batch_size >= 0, "micro_batch_size", self.micro_batch_size, "must be >= 0")
        check(self.pack_width >= 0, "pack_width", self.pack_width, "must be >= 0 (0: twice the longest sequence)")
        check(self.train.lr > 0, "train.lr", self.train.lr, "must be > 0")
        check(0 <= self.final_lr_ratio <= 1, "final_lr_ratio", self.final_lr_ratio, "must be in [0, 1]")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        check(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "must be >= 1")
        check(self.reward_std > 0, "reward_std", self.reward_std, "must be > 0")
        check(self.train_eval_prompts >= 0, "train_eval_prompts", self.train_eval_prompts, "must be >= 0 (0: all)")


@dataclass
class Comparison:
    """One prompt's K responses as token sequences, and its (winner, loser) pairs."""

    sequences: list[list[int]]
    """K sequences query + response (text.py layout), response i at index i."""
    pairs: list[tuple[int, int]]
    """(winner, loser) indices into `sequences`; ties give none (§3.5)."""
    prompt_lens: list[int] = field(default_factory=list)
    """Tokens of the query at the start of each sequence, for packing (empty: none shared)."""


@dataclass
class RMBatch:
    input_ids: torch.Tensor
    """(N, T) every response of every prompt, right-padded, N = Σ K_i; packed: (B, T'),
    several responses per row over one copy of their prompt (text.pack)."""
    attention_mask: torch.Tensor
    """(N, T); packed: (B, 1, T', T')."""
    winners: torch.Tensor
    """(P,) row of the preferred response of each comparison; P = Σ (pairs of prompt i)."""
    losers: torch.Tensor
    """(P,) row of the other response."""
    weights: torch.Tensor
    """(P,) 1 / (pairs of its prompt · prompts in the batch): each prompt weighs the same."""
    offsets: list[int] = field(default_factory=list)
    """Prompt i owns rows offsets[i] : offsets[i] + sizes[i]."""
    sizes: list[int] = field(default_factory=list)
    """K_i, the number of responses of prompt i."""
    pairs: list[list[tuple[int, int]]] = field(default_factory=list)
    """Per prompt, (winner, loser) indices local to that prompt."""
    position_ids: torch.Tensor | None = None
    """Packed only: (B, T') each response's positions continue its prompt's."""
    score_at: tuple[torch.Tensor, torch.Tensor] | None = None
    """Packed only: (rows, cols), each (N,): where response n's last token sits."""

    def to(self, device) -> RMBatch:
        tensors = ("input_ids", "attention_mask", "winners", "losers", "weights")
        moved = {k: getattr(self, k).to(device) for k in tensors}
        if self.position_ids is not None:
            moved.update(position_ids=self.position_ids.to(device), score_at=tuple(t.to(device) for t in self.score_at))
        return dataclasses.replace(self, **moved)

    def scores(self, scorer) -> torch.Tensor:
        """`scorer(ids, mask, position_ids, score_at)` (reward_scores): (N,) in row order."""
        return scorer(self.input_ids, self.attention_mask, self.position_ids, self.score_at)


# --------------------------------------------------------------------------- loss


def kwise_loss(scores: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """−1/C(K,2) · Σ log σ(r_w − r_l) over one prompt's comparisons (§3.5, eq. 1).

    scores (K,) rewards of one prompt's responses; pairs from `Ranking.pairs()`. With ties
    dropped there are fewer than C(K,2) pairs and the mean is over those that remain.
    """
    w = torch.tensor([p[0] for p in pairs], device=scores.device)
    lose = torch.tensor([p[1] for p in pairs], device=scores.device)
    return -F.logsigmoid(scores[w] - scores[lose]).mean()


def batch_loss(scores: torch.Tensor, batch: RMBatch) -> tuple[torch.Tensor, float]:
    """Mean over the batch's prompts of `kwise_loss`, in one gather; and the pair accuracy.

    scores (N,) for the batch's rows. Returns (loss, fraction of pairs ordered right).
    """
    margin = scores[batch.winners] - scores[batch.losers]  # (P,) r_w − r_l
    loss = -(batch.weights * F.logsigmoid(margin)).sum()
    correct = (margin > 0).float() + 0.5 * (margin == 0).float()  # a score tie counts half
    return loss, float(correct.mean())


def collate(
    comparisons: list[Comparison], pad_id: int, pack_width: int | None = None, additive: bool = True
) -> RMBatch:
    """All K_i responses of each prompt into one batch; its pairs as global rows (response
    j of prompt i is row offsets[i] + j). `pack_width` None: one right-padded row per
    response; else packed rows of that many token slots (0: twice the longest sequence),
    each prompt once per row it shares (`text.pack`; `additive`: the mask's kind)."""
    seqs, offsets, winners, losers, weights = [], [], [], [], []
    for c in comparisons:
        off = len(seqs)
        offsets.append(off)
        seqs.extend(c.sequences)
        winners += [off + w for w, _ in c.pairs]
        losers += [off + lose for _, lose in c.pairs]
        weights += [1.0 / (len(c.pairs) * len(comparisons))] * len(c.pairs)
    extra = {}
    if pack_width is None:
        ids, mask = pad_right(seqs, pad_id)
    else:
        groups, order = _prompt_groups(comparisons, offsets)
        packed = pack(groups, pad_id, pack_width)
        rows, cols = torch.empty_like(packed.rows), torch.empty_like(packed.cols)
        rows[order], cols[order] = packed.rows, packed.cols  # packing order -> row order
        ids, mask = packed.input_ids, packed.attention_mask(additive)
        extra = dict(position_ids=packed.position_ids, score_at=(rows, cols))
    return RMBatch(
        ids,
        mask,
        torch.tensor(winners),
        torch.tensor(losers),
        torch.tensor(weights),
        offsets,
        [len(c.sequences) for c in comparisons],
        [c.pairs for c in comparisons],
        **extra,
    )


def _prompt_groups(comparisons: list[Comparison], offsets: list[int]):
    """(prompt, responses) groups for `text.pack`: a prompt's responses that start with
    the same query tokens share one copy of it (a chat template's may differ per response);
    and `order`, the batch row of each packed sequence in packing order."""
    groups, order = [], []
    for c, off in zip(comparisons, offsets, strict=True):
        by_query: dict[tuple, list[int]] = {}
        lens = c.prompt_lens or [0] * len(c.sequences)
        for j, (seq, n) in enumerate(zip(c.sequences, lens, strict=True)):
            by_query.setdefault(tuple(seq[:n]), []).append(j)
        for query, members in by_query.items():
            groups.append((list(query), [c.sequences[j][len(query) :] for j in members]))
            order += [off + j for j in members]
    return groups, torch.tensor(order)


def _n_correct(scores: list[float], pairs) -> float:
    return sum(1.0 if scores[w] > scores[lose] else 0.5 if scores[w] == scores[lose] else 0.0 for w, lose in pairs)


# --------------------------------------------------------------------------- data


def encode_rankings(tokenizer, rankings: list[Ranking], path: str, max_len: int | None) -> list[Comparison]:
    """Token sequences per ranking, refusing any prompt + response that overflows the context."""
    out = []
    for r in rankings:
        where = dict(file=path, line=r.line, field="prompt")
        query = encode_query(tokenizer, r.prompt, where)
        if max_len is not None and len(query) >= max_len:
            raise InputError(
                f"prompt is {len(query)} tokens, the model's context is {max_len}",
                file=path,
                line=r.line,
                field="prompt",
            )
        pairs = [encode_pair(tokenizer, r.prompt, resp, where) for resp in r.responses]
        seqs = [q + a for q, a in pairs]
        for i, s in enumerate(seqs):
            if max_len is not None and len(s) > max_len:
                raise InputError(
                    f"prompt + response is {len(s)} tokens, the model's context is {max_len}",
                    file=path,
                    line=r.line,
                    field=f"responses[{i}]",
                )
        out.append(Comparison(seqs, r.pairs(), [len(q) for q, _ in pairs]))
    return out


def check_demos(tokenizer, demos, path: str, max_len: int | None) -> None:
    for d in demos:
        n = len(encode_sequence(tokenizer, d.prompt, d.completion, dict(file=path, line=d.line, field="prompt")))
        if max_len is not None and n > max_len:
            raise InputError(
                f"prompt + completion is {n} tokens, the model's context is {max_len}",
                file=path,
                line=d.line,
                field="completion",
            )


# --------------------------------------------------------------------------- accuracy


def evaluate(
    model, comparisons: list[Comparison], pad_id: int, batch_size: int, dist=distributed.SINGLE, scorer=None
) -> dict:
    """Mean K-wise loss and pairwise accuracy (score ties count half) over comparisons.
    With `dist` the scoring is shared out over the ranks (through `scorer`, see
    `score_sequences`), and every rank gets the same result."""
    flat = [s for c in comparisons for s in c.sequences]

    def score(part: list) -> list[float]:
        return score_sequences(model, part, pad_id, batch_size, scorer=scorer)

    scores = torch.tensor(dist.map_shards(score, flat))
    losses, correct, total, off = [], 0.0, 0, 0
    for c in comparisons:
        s = scores[off : off + len(c.sequences)]
        losses.append(float(kwise_loss(s, c.pairs)))
        correct += _n_correct(s.tolist(), c.pairs)
        total += len(c.pairs)
        off += len(c.sequences)
    return {"loss": sum(losses) / len(losses), "accuracy": correct / total}


def pairwise_accuracy(model, tokenizer, rankings: list[Ranking], batch_size: int = 32) -> float:
    """Fraction of (winner, loser) pairs the RM orders correctly (ties in the data dropped)."""
    comparisons = encode_rankings(tokenizer, rankings, "<rankings>", context_length(model.config))
    return evaluate(model, comparisons, tokenizer.pad_token_id, batch_size)["accuracy"]


# --------------------------------------------------------------------------- train


def read_inputs(config: RMConfig):
    """(tokenizer, model, train comparisons, val comparisons, demos, policy-sample
    sequences), all checked."""
    tokenizer = load_tokenizer(config.base)
    set_seed(config.run.seed)  # the fresh head's initialisation
    model = load_reward_model(config.base)
    model.config.pad_token_id = tokenizer.pad_token_id  # for HF's own forward, too
    max_len = context_length(model.config)
    train_set = encode_rankings(tokenizer, read_rankings(config.rankings), config.rankings, max_len)
    val_set = None
    if config.val_rankings:
        val_set = encode_rankings(tokenizer, read_rankings(config.val_rankings), config.val_rankings, max_len)
    demos = read_demos(config.demos) if config.demos else None
    if demos:
        check_demos(tokenizer, demos, config.demos, max_len)
    samples = encode_samples(tokenizer, config.policy_samples, max_len) if config.policy_samples else None
    return tokenizer, model, train_set, val_set, demos, samples


def train(config: RMConfig, callback=None) -> tuple[Path, dict]:
    """Train a reward model from `config.base` on `config.rankings`.

    Returns (<out_dir>/model, summary).

    `callback(step, row)` runs after every optimizer step (tests raise from it to simulate
    an interruption).
    """
    validate(config)
    out_dir, t0 = Path(config.out_dir), time.time()
    # 1. Read and check every input before anything is written (the fresh head's seed is
    # the same on every rank: FSDP shards, and does not broadcast, what each rank built).
    tokenizer, model, train_set, val_set, demos, samples = read_inputs(config)
    dist = distributed.setup(resolve_device(config.run.device))  # one process, or this rank of torchrun's
    device, pad_id = dist.device, tokenizer.pad_token_id
    fast_kernels(model.to(device).train(), device, config.train.precision)
    if config.train.gradient_checkpointing:
        checkpoint_activations(model)
    # reward_scores calls model.base_model and model.score: trained through a root forward
    # that DDP and FSDP see (distributed.Forward); in one process, the model itself.
    scorer = distributed.wrap(model, config.train.parallel, dist, forward=reward_scores)
    packing = (config.pack_width, additive_mask(model)) if config.pack and supports_packing(model) else None
    if config.pack and packing is None and dist.is_main:
        print(f"rm: {model.config._attn_implementation} attention takes no 4D mask; training on padded rows")

    def end_of_epoch(epoch: int, state: dict) -> dict:  # held-out loss and accuracy
        record = {"epoch": epoch + 1}
        if val_set is not None:
            val = evaluate(model, val_set, pad_id, config.eval_batch_size, dist, scorer)
            record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
        state["epochs"].append(record)
        return {f"rm/{k}": v for k, v in record.items()}

    # 2-4. One step = a batch of prompts, each one batch element with all its comparisons.
    n, bs = len(train_set), config.batch_size
    state, log = fit(
        model,
        config,
        Loop(
            "rm",
            epochs=config.epochs,
            steps_per_epoch=math.ceil(n / bs),
            batch=lambda e, b: [train_set[i] for i in shuffled_batch(n, bs, config.run.seed, e, b)],
            loss=lambda chunk, scale: _loss(scorer, chunk, pad_id, config, device, scale, dist, packing),
            end_of_epoch=end_of_epoch,
        ),
        callback=callback,
        dist=dist,
    )

    # 5. Train accuracy over the whole set; the gain on policy samples and the demo-centring
    # bias (§3.5); atomic output.
    train_part = train_set[: config.train_eval_prompts or len(train_set)]
    train_eval = evaluate(model, train_part, pad_id, config.eval_batch_size, dist, scorer)
    final = {"rm/train_accuracy": train_eval["accuracy"]}
    final.update(normalize(model, tokenizer, samples, demos, config, dist, scorer))
    plain = distributed.full_model(model, dist)  # None on ranks other than 0
    if plain is not None:
        apply_normalization(plain, final)  # on the full weights
        plain.config.pad_token_id = hf_pad_token_id(tokenizer)  # HF's own pooling then reads our token
    log.log({"step": state["step"], **final})
    summary = {
        "stage": "rm",
        "base": config.base,
        "prompts": len(train_set),
        "comparisons": sum(len(c.pairs) for c in train_set),
        "steps": state["step"],
        "epochs": state["epochs"],
        "bias": final.get("rm/bias", 0.0),
        "gain": final["rm/gain"],
        **final,
        "seconds": round(time.time() - t0, 1),
    }
    return write_outputs(out_dir, plain, tokenizer, summary, dist), summary


def _loss(
    scorer,
    chunk: list[Comparison],
    pad_id: int,
    config: RMConfig,
    device,
    scale: float = 1.0,
    dist=distributed.SINGLE,
    packing: tuple[int, bool] | None = None,
) -> tuple[torch.Tensor, dict]:
    """Forward and backward of one batch of prompts (this rank's part), micro-batches
    accumulating gradients; `scorer` is reward_scores through DDP/FSDP; `packing`: None
    (padded rows) or (pack_width, additive mask) for `collate`.
    Returns (the part's loss, {rm/accuracy: (pairs ordered right, pairs)})."""
    width, additive = packing if packing is not None else (None, True)
    micro = config.micro_batch_size or len(chunk)
    parts = [chunk[i : i + micro] for i in range(0, len(chunk), micro)]
    # Every rank runs as many forwards and backwards (FSDP's all-gathers, one gradient
    # reduction per step): a rank with fewer micro-batches repeats its last, weighted 0.
    n_parts = dist.max(len(parts))
    total_loss, correct = torch.zeros((), device=device), 0.0
    for j in range(n_parts):
        real = j < len(parts)
        part = collate(parts[j] if real else parts[-1], pad_id, width, additive).to(device)
        with distributed.no_sync(scorer, active=j < n_parts - 1):
            with autocast(device, config.train.precision):
                scores = part.scores(scorer)  # (N,), fp32
            loss, accuracy = batch_loss(scores, part)
            weight = len(part.offsets) / len(chunk) if real else 0.0  # the loss: a mean over prompts
            (loss * weight * scale).backward()
        if real:
            total_loss += loss.detach() * weight
            correct += accuracy * sum(len(p) for p in part.pairs)
    return total_loss, {"rm/accuracy": (correct, sum(len(c.pairs) for c in chunk))}


# --------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    add_config_arguments(parser, RMConfig)


def run_cli(args) -> int:
    config = config_from_args(RMConfig, args)
    out_dir, summary = train(config)
    if not distributed.is_main_process():
        return 0
    val = summary["epochs"][-1].get("val_accuracy")
    print(
        f"rm: wrote {out_dir} (train accuracy {summary['rm/train_accuracy']:.3f}"
        + (f", val accuracy {val:.3f}" if val is not None else "")
        + ")"
    )
    return 0
