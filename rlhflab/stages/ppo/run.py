"""Opening a PPO run: check every input, load the four models, data streams, checkpoints.

`open_run(config)` refuses bad input (files, models that do not load or do not share a
vocabulary, prompts too long for the context) with an InputError naming the file, line
and field, before anything is written. The returned `Run` holds the live training state
and knows how to save and restore it (`<out_dir>/checkpoint`, via checkpoint.py).

Under torchrun `open_run` joins the process group (rlhflab.distributed) and every rank
holds the four models: the policy and the value model wrapped for training per
train.parallel (DDP or FSDP2, `policy_train` / `value_train`), the reference and the
reward model replicated. Checkpoints are then sharded; one made by N processes resumes
on M (parallel.py has the rest).
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlhflab import adapters, checkpoint, data, distributed
from rlhflab.config import flat_dict
from rlhflab.device import fast_kernels
from rlhflab.distributed import SINGLE, Dist
from rlhflab.errors import InputError
from rlhflab.models import context_length, load_causal_lm, load_reward_model, load_tokenizer, token_values
from rlhflab.stages.ppo.core import AdaptiveKLController, FixedKLController
from rlhflab.stages.ppo.parallel import check_parallel
from rlhflab.text import encode_documents, encode_query, pad_right
from rlhflab.training import NonFiniteGuard, adam, check_resumable, resolve_device

if TYPE_CHECKING:
    from rlhflab.stages.ppo.config import PPOConfig

# Config keys a resumed run may change; any other change would alter the trajectory.
RESUME_FREE = {
    "total_episodes",
    "eval_every",
    "train.save_every",
    "world",
    "val_prompts",
    "run.device",
    "run.report_to",
    "train.parallel",
    "train.gradient_checkpointing",
    "resume",
    "out_dir",
}


class Stream:
    """An endless stream of indices 0..n-1: one seeded permutation per pass."""

    def __init__(self, n: int, seed: int, position: int = 0):
        self.n, self.seed, self.position = n, seed, position
        self._epoch, self._perm = -1, []

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            epoch, offset = divmod(self.position, self.n)
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
            n = min(k - len(out), self.n - offset)
            out.extend(self._perm[offset : offset + n])
            self.position += n
        return out


@dataclass
class Run:
    """Everything a PPO run holds while it trains."""

    config: PPOConfig
    device: torch.device
    tokenizer: object
    policy: torch.nn.Module  # π_θ, trained
    ref_policy: torch.nn.Module  # π_SFT, frozen
    reward_model: torch.nn.Module  # r_θ, frozen
    value_model: torch.nn.Module  # V, trained (initialised from the RM)
    ema: torch.nn.Module | None  # EMA of π_θ's weights, or None
    queries: list[list[int]]
    val_queries: list[list[int]]
    ptx: list[list[int]] | None
    prompt_stream: Stream
    ptx_stream: Stream | None
    optimizer: torch.optim.Optimizer = None
    kl_ctl: FixedKLController = None
    guard: NonFiniteGuard = field(default_factory=lambda: NonFiniteGuard(5, "ppo"))
    lora: adapters.LoRA | None = None  # peft's wrappers of policy and value_model; None: full fine-tuning
    dist: Dist = SINGLE  # this process among torchrun's (one process: SINGLE)
    policy_train: torch.nn.Module = None  # π_θ to train through: DDP(policy), or policy itself (FSDP, one process)
    value_train: torch.nn.Module = None  # (ids, mask) -> V per token (B, T), through DDP/FSDP's root forward

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def policy_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    @property
    def value_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.value_model.parameters() if p.requires_grad]

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return self.policy_params + self.value_params

    def ptx_batch(self, n_episodes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ptx_per_episode × n_episodes pretraining texts, right-padded.  -> ids, mask (N, T)"""
        n = max(1, round(self.config.ptx_per_episode * n_episodes))
        ids, mask = pad_right([self.ptx[i] for i in self.ptx_stream.take(n)], self.pad_id)
        return ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------ checkpoints

    def _modules(self) -> dict:
        mods = {"policy": self.policy, "value": self.value_model}
        if self.lora is not None:  # the adapters and the value head: the frozen rest is on disk already
            mods = {name: adapters.trainable(model) for name, model in mods.items()}
        if self.ema is not None:
            mods["ema"] = self.ema
        return mods

    def save_checkpoint(self, step: int) -> None:
        state = {
            "step": step,
            "prompt_position": self.prompt_stream.position,
            "ptx_position": self.ptx_stream.position if self.ptx_stream else 0,
            "kl_ctl": self.kl_ctl.state_dict(),
            "skipped": self.guard.skipped,
            "config": _trajectory_config(self.config),
        }
        modules, optimizers = self._modules(), {"optimizer": self.optimizer}
        checkpoint.save_checkpoint(self.config.out_dir, modules, optimizers, state, self.dist)

    def restore_or_start(self) -> int:
        """Load <out_dir>/checkpoint if resuming; return the step it ends at (0: fresh).
        Every rank calls it; a checkpoint of any number of processes loads."""
        out = Path(self.config.out_dir)
        if not checkpoint.has_checkpoint(out, self.dist):
            return 0
        if not self.config.resume:
            if self.dist.is_main:
                shutil.rmtree(out / checkpoint.CHECKPOINT)
            self.dist.barrier()
            return 0
        _check_resumable(self.config, out)
        state = checkpoint.load_checkpoint(out, self._modules(), {"optimizer": self.optimizer}, self.dist)
        self.prompt_stream.position = state["prompt_position"]
        if self.ptx_stream is not None:
            self.ptx_stream.position = state["ptx_position"]
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.guard.skipped = state.get("skipped", 0)
        return int(state["step"])


def _trajectory_config(config) -> dict:
    return {k: v for k, v in flat_dict(config).items() if k not in RESUME_FREE}


def _check_resumable(config, out: Path) -> None:
    path = out / checkpoint.CHECKPOINT / checkpoint.STATE
    try:
        saved = json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError):
        raise InputError("unreadable checkpoint state", file=str(path)) from None
    check_resumable(saved, _trajectory_config(config), str(out / checkpoint.CHECKPOINT), ignore=())


# --------------------------------------------------------------------------- opening a run


def open_run(config) -> Run:
    """Validate all inputs and load everything; nothing is written. Under torchrun: this
    rank's Run (the process group joined, what W processes cannot run refused first)."""
    dist = distributed.setup(resolve_device(config.run.device))
    check_parallel(config, dist)
    data.read_prompts(config.prompts)  # every data file is checked before a model loads
    val_prompts = data.read_prompts(config.val_prompts) if config.val_prompts else []
    texts = data.read_texts(config.ptx_data) if config.ptx_data else None
    if config.world and not Path(config.world).is_dir():
        raise InputError("lab world directory not found", file=config.world, field="world")
    if Path(config.out_dir).is_file():
        raise InputError("is a file, not a directory", file=config.out_dir, field="out_dir")

    tok = load_tokenizer(config.policy)
    if tok.eos_token_id is None:
        raise InputError("the tokenizer has no eos token", file=config.policy, field="policy")
    policy = load_causal_lm(config.policy)
    reward_model = _load_reward_model(config.reward_model, "reward_model")
    value_model = load_reward_model(config.value_model) if config.value_model else copy.deepcopy(reward_model)
    _check_vocab(tok, policy, config.policy, "policy")
    _check_vocab(tok, reward_model, config.reward_model, "reward_model")
    if config.value_model:
        _check_vocab(tok, value_model, config.value_model, "value_model")

    # The shortest context of the three (None: none has a fixed limit).
    context = min(
        (c for m in (policy, reward_model, value_model) if (c := context_length(m.config)) is not None),
        default=None,
    )
    queries = _encode_prompts(tok, config.prompts, context, config.max_new_tokens)
    val_queries = _encode_prompts(tok, config.val_prompts, context, config.max_new_tokens) if val_prompts else []
    ptx = encode_documents(tok, texts, context_length(policy.config)) if texts is not None else None
    return _assemble(config, tok, policy, reward_model, value_model, queries, val_queries, ptx, dist)


def _assemble(config, tok, policy, reward_model, value_model, queries, val_queries, ptx, dist: Dist = SINGLE) -> Run:
    device = dist.device
    lora = None
    if config.lora_r:  # adapters on π and V; π_SFT is π's own base with them off: no copy
        lora = adapters.add_lora(policy, value_model, config.lora_r, config.lora_alpha, config.lora_target_modules)
        ref_policy = adapters.Reference(lora.policy)
    else:
        ref_policy = copy.deepcopy(policy)
    ema = copy.deepcopy(policy) if config.ema_decay is not None else None
    for frozen in (ref_policy, reward_model, ema):  # π_SFT and r_θ never change (§3.5)
        if frozen is not None:
            frozen.requires_grad_(False)
    for model in (policy, ref_policy, reward_model, value_model, ema):
        if model is not None:
            model.to(device).eval()  # dropout off everywhere, trained models included
            fast_kernels(model, device, config.train.precision)
    if config.train.gradient_checkpointing:  # activations recomputed in the backward
        for model in (policy, value_model):
            adapters.checkpoint_activations(model, eval_mode=True)
    run = Run(
        config,
        device,
        tok,
        policy,
        ref_policy,
        reward_model,
        value_model,
        ema,
        queries,
        val_queries,
        ptx,
        Stream(len(queries), config.run.seed),
        Stream(len(ptx), config.run.seed + 1) if ptx is not None else None,
        guard=NonFiniteGuard(5, "ppo", dist),
        lora=lora,
        dist=dist,
        # Trained through DDP (or FSDP2, which shards policy and value_model in place); the
        # value function through a root forward DDP and FSDP see (distributed.Forward).
        policy_train=distributed.wrap(policy, config.train.parallel, dist),
        value_train=distributed.wrap(value_model, config.train.parallel, dist, forward=token_values),
    )
    # Adam with β2 = 0.95 as in App. C (eps as lm-human-preferences); built over the
    # parameters FSDP leaves (its shards).
    run.optimizer = adam(run.trainable, decoupled=False, lr=config.train.lr, betas=(0.9, 0.95), eps=1e-5)
    run.kl_ctl = (
        AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
        if config.adaptive_kl
        else FixedKLController(config.kl_coef)
    )
    return run


def _load_reward_model(path: str, key: str):
    """The RM must be a trained one-label sequence-classification model with a `score` head:
    an LM directory would get a random head. Any such directory loads: rlhflab's own, or one
    another tool saved with `save_pretrained` (its bias, if any, is in its weights)."""
    cfg_path = Path(path) / "config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except ValueError:
            raise InputError("config.json is not valid JSON", file=str(cfg_path)) from None
        archs = cfg.get("architectures") or []
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            raise InputError(
                f"not a reward model (architectures: {', '.join(archs)}); train one with `rlhflab rm`",
                file=str(path),
                field=key,
            )
        labels = len(cfg.get("id2label") or {}) or cfg.get("num_labels") or 1
        if labels != 1:
            raise InputError(
                f"a classifier with {labels} labels, not a reward model (one scalar output)", file=str(path), field=key
            )
    model = load_reward_model(path)
    if not isinstance(getattr(model, "score", None), torch.nn.Linear):
        raise InputError(
            f"{type(model).__name__} has no `score` head, which rlhflab reads as the reward", file=str(path), field=key
        )
    return model


def _check_vocab(tok, model, path: str, key: str) -> None:
    rows = model.get_input_embeddings().num_embeddings
    if rows < len(tok):
        raise InputError(f"embeds {rows} tokens but the policy's tokenizer has {len(tok)}", file=str(path), field=key)
    if key != "policy" and (
        (Path(path) / "tokenizer.json").is_file() or (Path(path) / "tokenizer_config.json").is_file()
    ):
        other = load_tokenizer(path)
        if other.get_vocab() != tok.get_vocab() or other.eos_token_id != tok.eos_token_id:
            raise InputError(
                "its tokenizer differs from the policy's (PPO scores token ids, so they must share one vocabulary)",
                file=str(path),
                field=key,
            )
    if key == "reward_model" and tok.eos_token_id is not None and model.config.pad_token_id == tok.eos_token_id:
        # transformers pools at the last token != pad_token_id, so such an RM was likely
        # trained, and scores elsewhere, at the token before the eos; rlhflab reads the eos.
        warnings.warn(
            f"{path}: the reward model's pad_token_id is the eos id: plain transformers scores it at the "
            "token before a response's eos, rlhflab at the eos itself, so the two give different scores",
            UserWarning,
            stacklevel=2,
        )


def _encode_prompts(tok, path: str, context: int | None, max_new: int) -> list[list[int]]:
    """Query ids of every prompt (a conversation with its generation prompt), each checked
    to leave room for max_new_tokens in the context."""
    out = []
    for line, prompt in data.read_prompt_rows(path):
        q = encode_query(tok, prompt, dict(file=str(path), line=line, field="prompt"))
        if context is not None and len(q) + max_new > context:
            raise InputError(
                f"{len(q)} tokens + max_new_tokens {max_new} exceed the model context of {context}",
                file=str(path),
                line=line,
                field="prompt",
            )
        out.append(q)
    return out
