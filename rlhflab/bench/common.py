"""What both sides of `rlhflab bench` share: the workloads, their inputs, the figures.

A workload fixes everything that sets the cost of a PPO step (model shape, prompt and
response lengths, batch sizes, epochs, device, threads). `build_inputs` writes its models
(random init, from config), tokenizer and prompts; `side_result` turns one side's
measured steps into the figures the report prints.
"""

from __future__ import annotations

import json
import platform
import random
import resource
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workload:
    name: str
    n_layer: int
    """GPT-2 blocks."""
    n_embd: int
    """Model width."""
    n_head: int
    """Attention heads."""
    vocab_size: int
    """Tokenizer and embedding rows (pad, bos, eos, unk included)."""
    n_positions: int
    """Position embeddings (1024 as GPT-2: counted in the parameters)."""
    prompt_len: int
    """Tokens per query (bos included); every prompt has exactly this many."""
    response_len: int
    """Tokens per response, always reached (eos suppressed)."""
    batch_size: int
    """Episodes per PPO step."""
    minibatch_size: int
    """Episodes per optimizer step, in one forward/backward (the micro-batch: no accumulation)."""
    ppo_epochs: int
    """Passes over each batch."""
    device: str
    """cpu or cuda."""
    threads: int | None
    """torch intra-op threads on CPU (None: torch's default)."""
    steps: int
    """PPO steps per side, the first one (warm-up) left out of the figures."""
    description: str = ""


WORKLOADS = {
    "cpu": Workload(
        "cpu",
        n_layer=4,
        n_embd=128,
        n_head=4,
        vocab_size=2048,
        n_positions=1024,
        prompt_len=32,
        response_len=32,
        batch_size=64,
        minibatch_size=64,
        ppo_epochs=4,
        device="cpu",
        threads=2,
        steps=8,
        description="GPT-2 shape, 4 layers, d 128, vocab 2048, on 2 CPU cores",
    ),
    "gpu": Workload(
        "gpu",
        n_layer=12,
        n_embd=768,
        n_head=12,
        vocab_size=50257,
        n_positions=1024,
        prompt_len=64,
        response_len=64,
        batch_size=512,
        minibatch_size=128,
        ppo_epochs=4,
        device="cuda",
        threads=None,
        steps=6,
        description="GPT-2 small (124M) x4 models, on one CUDA GPU",
    ),
    "tiny": Workload(
        "tiny",
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=256,
        n_positions=64,
        prompt_len=8,
        response_len=8,
        batch_size=8,
        minibatch_size=8,
        ppo_epochs=2,
        device="cpu",
        threads=2,
        steps=3,
        description="a seconds-long smoke test of the bench itself",
    ),
}

# PPO hyperparameters both sides run with, pinned here so a change of rlhflab's defaults
# does not move the benchmark. Values of §3.5 / App. C.4 and rlhflab's lab defaults.
PPO_SETTINGS = dict(
    lr=1e-4,
    kl_coef=0.02,
    temperature=1.0,
    clip_range=0.2,
    value_clip_range=0.2,
    vf_coef=0.1,
    gamma=1.0,
    lam=0.95,
)
N_PROMPTS = 1024
SEED = 0


# --------------------------------------------------------------------------- inputs


def build_inputs(w: Workload, root: Path) -> dict[str, str]:
    """Tokenizer, policy and reward model (random init, from config) and prompts under root."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        GPT2LMHeadModel,
        PreTrainedTokenizerFast,
    )

    import rlhflab.models  # noqa: F401  (quiets transformers' progress bars)

    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"]
    words = [f"w{i}" for i in range(w.vocab_size - len(specials))]
    vocab = {t: i for i, t in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        unk_token="<|unk|>",
    )
    # A stock GPT-2 config (gelu_new, as every GPT-2 checkpoint): each side runs it as it
    # would any GPT-2 it loads (rlhflab swaps in its own kernels; see --trl-kernels).
    cfg = GPT2Config(
        vocab_size=w.vocab_size,
        n_positions=w.n_positions,
        n_embd=w.n_embd,
        n_layer=w.n_layer,
        n_head=w.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        num_labels=1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    paths = {"policy": root / "policy", "reward_model": root / "rm", "prompts": root / "prompts.jsonl"}
    torch.manual_seed(SEED)
    GPT2LMHeadModel(cfg).save_pretrained(paths["policy"])
    torch.manual_seed(SEED + 1)
    GPT2ForSequenceClassification(cfg).save_pretrained(paths["reward_model"])
    for key in ("policy", "reward_model"):
        tok.save_pretrained(str(paths[key]))
    rng = random.Random(SEED)
    with open(paths["prompts"], "w", encoding="utf-8") as f:
        for _ in range(N_PROMPTS):  # bos + (prompt_len - 1) words = prompt_len tokens
            prompt = " ".join(rng.choice(words) for _ in range(w.prompt_len - 1))
            f.write(json.dumps({"prompt": prompt}) + "\n")
    return {k: str(v) for k, v in paths.items()}


def n_params(w: Workload) -> int:
    """Parameters of the policy (GPT-2 LM head tied to the embeddings)."""
    d = w.n_embd
    block = 12 * d * d + 13 * d  # attn (qkv, proj) + mlp (4d) weights, biases, two LayerNorms
    return w.n_layer * block + (w.vocab_size + w.n_positions) * d + 2 * d


# --------------------------------------------------------------------------- one side


def side_result(
    wall: list[float],
    phases: list[dict],
    w: Workload,
    kl: list[float],
    rm_score: list[float],
    peak_bytes: int,
    memory_kind: str,
    **extra,
) -> dict:
    """Figures of one side from its measured steps (the warm-up step already dropped);
    kl and rm_score are per step, the warm-up's included."""
    total = sum(wall)
    split = {k: sum(p.get(k, 0.0) for p in phases) for k in ("generate", "score", "update")}
    split["other"] = max(total - sum(split.values()), 0.0)
    n = len(wall)
    episodes = n * w.batch_size
    return {
        "steps_measured": n,
        "episodes_per_s": episodes / total,
        "generated_tokens_per_s": episodes * w.response_len / max(split["generate"], 1e-9),
        "training_tokens_per_s": (
            w.ppo_epochs * episodes * (w.prompt_len + w.response_len) / max(split["update"], 1e-9)
        ),
        "step_s": total / n,
        "time_s": {k: v / n for k, v in split.items()},
        "time_share": {k: v / total for k, v in split.items()},
        "step_wall_s": wall,
        "peak_memory_mb": peak_bytes / 2**20,
        "memory": memory_kind,
        "final_kl": kl[-1],
        "final_rm_score": rm_score[-1],
        # One step's KL is one point of a noisy walk (TRL's peaks near 1 and falls back within
        # eight steps): the mean over every step's rollout compares two trainers more fairly.
        "mean_kl": sum(kl) / len(kl),
        "mean_rm_score": sum(rm_score) / len(rm_score),
        "kl_per_step": kl,
        "rm_score_per_step": rm_score,
        **extra,
    }


def peak_memory(device: str) -> tuple[int, str]:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    try:  # this process's own high-water mark (ru_maxrss would also count the parent's at fork)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "peak RSS"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
