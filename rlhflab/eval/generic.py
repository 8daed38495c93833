"""`rlhflab eval` without the lab world: your own policies, judged by your reward model.

Every policy answers the same prompts (sampled with one seed, so two copies of one model
give the same answers); the reward model scores each answer; the reference policy (e.g.
the SFT model) gives the KL of each policy's own samples. Nothing here needs gold scores
or simulated labelers, so the figures are the reward model's opinion, not the truth (§4's
human evaluations are what the lab world's `rlhflab eval` simulates).

    policies ──generate──▶ answers ──reward model──▶ scores ──▶ win rates vs the baseline
                               └──── log π − log π_ref, summed over response tokens ──▶ KL

Outputs in `out_dir`: `summary.json` (keys below), `samples.jsonl` (one row per prompt
and policy: index, prompt (a string, or a conversation as [{"role", "content"}, ...]),
policy, response, score, kl, length, ended) and `config.yaml`.
`<p>` is a policy name, `<b>` the baseline's (every policy, the baseline too, gets each key).

summary.json keys (docs/evaluation.md, "Without the lab world"):
  rm/<p>/win_vs_<b>       per prompt P(score of <p>'s answer > the baseline's), ties half
  rm/<p>/win_vs_<b>_ci    its 95% Wilson interval [low, high] over prompts
  rm/<p>/score, rm/<p>/score_ci   mean reward-model score; 95% normal interval [low, high]
  kl/<p>, kl_ci/<p>       mean over samples of Σ_t log π(y_t|x, y_<t) − log π_ref(y_t|x, y_<t)
                          on <p>'s own samples (nats per answer); 95% normal interval
  length/<p>              mean answer length in tokens (eos included where emitted)
  eos_rate/<p>            fraction of answers that ended by eos before max_new_tokens
  n/prompts               prompts evaluated
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig

from rlhflab.config import RunFields, check, config_from_args, save_config, validate
from rlhflab.data import read_prompt_rows
from rlhflab.errors import ConfigError, InputError
from rlhflab.eval.judging import win_rate
from rlhflab.generation import generate, generator_for
from rlhflab.io import write_json, write_jsonl
from rlhflab.models import context_length, load_causal_lm, load_reward_model, load_tokenizer
from rlhflab.stages.ppo.step import policy_logprobs
from rlhflab.stages.rm_score import score_sequences
from rlhflab.text import encode_query, pad_left, pad_right
from rlhflab.training import progress, resolve_device, set_seed

REFERENCE = "reference"
"""The reference policy's name where it is the baseline and no listed policy shares its directory."""


@dataclass
class GenericEvalConfig:
    policies: dict[str, str] = field(default_factory=dict)
    """Name -> policy directory (any local Hugging Face causal LM); on the command line
    `--policies sft=DIR,ppo=DIR`. The policies, the reference and the reward model share
    one tokenizer (prompts are encoded once, with the reference's)."""
    prompts: str = ""
    """Prompts file (JSONL, parquet or a `save_to_disk` directory) as `rlhflab.data.read_prompts`
    reads it: {"prompt": str} rows, or conversations ({"prompt": [messages]}, {"messages": [...]})
    rendered by the tokenizer's chat template."""
    reward_model: str = ""
    """Reward model directory (`rlhflab rm`'s model/, or any one-label sequence-classification
    model on the policies' tokenizer): it scores every answer."""
    reference: str = ""
    """Reference policy directory (e.g. the SFT model): KL is measured to it, and it is the
    baseline unless `baseline` names another policy."""
    baseline: str = ""
    """Name in `policies` every win rate is measured against; '': the reference (named after
    the policy with the reference's directory, else 'reference', then evaluated too)."""
    n_prompts: int = 0
    """Prompts evaluated, the first of the file; 0: all of them."""
    max_new_tokens: int = 48
    """Longest answer, in tokens; every prompt + max_new_tokens must fit each model's context."""
    temperature: float = 1.0
    """Sampling temperature, also that of the KL's log-probs (as PPO's objective/kl); 0: greedy
    (the KL column is then the log-ratio of the greedy answers, not an estimate of a KL)."""
    batch_size: int = 32
    """Prompts per generation, log-prob and scoring batch."""
    samples_shown: int = 10
    """Prompts in the report's table of samples (samples.jsonl holds every prompt)."""
    run: RunFields = field(default_factory=RunFields)
    """Seed (one sampling stream per policy, the same for every policy) and device."""
    out_dir: str = "runs/eval"
    """Output directory: summary.json, samples.jsonl, config.yaml (and report.html from the CLI)."""

    def validate(self) -> None:
        check(bool(self.policies), "policies", self.policies, "give at least one name=DIR")
        for name, path in self.policies.items():
            ok = isinstance(name, str) and name != "" and not set(name) & set("/,=")
            check(ok, "policies", name, "policy names must be non-empty and contain no '/', ',' or '='")
            check(isinstance(path, str) and path != "", f"policies.{name}", path, "must be a directory")
        for key in ("prompts", "reward_model", "reference", "out_dir"):
            check(bool(getattr(self, key)), key, getattr(self, key), "required")
        check(
            not self.baseline or self.baseline in self.policies,
            "baseline",
            self.baseline,
            f"must be '' (the reference) or one of {list(self.policies)}",
        )
        named_ref = self.policies.get(REFERENCE)
        check(
            named_ref is None or _same_dir(named_ref, self.reference),
            f"policies.{REFERENCE}",
            named_ref,
            f"'{REFERENCE}' names the reference policy; give this policy another name",
        )
        check(self.n_prompts >= 0, "n_prompts", self.n_prompts, "must be >= 0 (0: all)")
        check(self.max_new_tokens > 0, "max_new_tokens", self.max_new_tokens, "must be positive")
        check(
            self.temperature >= 0 and math.isfinite(self.temperature),
            "temperature",
            self.temperature,
            "must be >= 0 (0: greedy)",
        )
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        check(self.samples_shown >= 0, "samples_shown", self.samples_shown, "must be >= 0")

    def baseline_name(self) -> str:
        """The baseline: `baseline`, else the policy whose directory is the reference's, else 'reference'."""
        if self.baseline:
            return self.baseline
        return next((n for n, p in self.policies.items() if _same_dir(p, self.reference)), REFERENCE)

    def entries(self) -> dict[str, str]:
        """Every evaluated name -> directory: the policies, then the reference where it is the
        baseline under its own name."""
        out = dict(self.policies)
        if self.baseline_name() == REFERENCE:
            out[REFERENCE] = self.reference
        return out


def _same_dir(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve()


# --------------------------------------------------------------------------- inputs


def _model_dir(path: str, key: str, what: str) -> tuple:
    """(tokenizer, context length) of a model directory, refused as input when it is not one."""
    if not (Path(path) / "config.json").is_file():
        raise InputError(f"not a Hugging Face model directory (no config.json) for the {what}", file=path, field=key)
    try:
        n_pos = context_length(AutoConfig.from_pretrained(path, local_files_only=True))
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot read the model config: {str(e).splitlines()[0]}", file=path, field=key) from None
    return load_tokenizer(path), n_pos


def read_inputs(cfg: GenericEvalConfig) -> tuple[list, list[list[int]], object]:
    """Prompts, their token queries and the shared tokenizer, every input checked first:
    each directory is a model whose tokenizer is the reference's, and each prompt's query
    plus max_new_tokens fits every model's context (an answer is never cut to fit)."""
    dirs = {"reference": (cfg.reference, "reference policy"), "reward_model": (cfg.reward_model, "reward model")}
    dirs |= {f"policies.{n}": (p, f"policy {n!r}") for n, p in cfg.policies.items()}
    found = {key: _model_dir(path, key, what) for key, (path, what) in dirs.items()}
    tokenizer = found["reference"][0]
    for key, (tok, _) in found.items():
        same = tok.get_vocab() == tokenizer.get_vocab() and tok.eos_token_id == tokenizer.eos_token_id
        if not same:
            raise InputError("its tokenizer differs from the reference policy's", file=dirs[key][0], field=key)
    limits = [(n_pos, key) for key, (_, n_pos) in found.items() if n_pos is not None]
    rows = read_prompt_rows(cfg.prompts)[: cfg.n_prompts or None]  # read_prompts, with row numbers
    prompts, lines = [p for _, p in rows], [n for n, _ in rows]
    where = [{"file": cfg.prompts, "line": n, "field": "prompt"} for n in lines]
    queries = [encode_query(tokenizer, p, where=w) for p, w in zip(prompts, where)]
    for q, line in zip(queries, lines):
        for n_pos, key in limits:
            if len(q) + cfg.max_new_tokens > n_pos:
                raise InputError(
                    f"prompt is {len(q)} tokens; with max_new_tokens {cfg.max_new_tokens} it overflows "
                    f"the context of {key} ({n_pos})",
                    file=cfg.prompts,
                    line=line,
                    field="prompt",
                )
    return prompts, queries, tokenizer


# --------------------------------------------------------------------------- measuring


@dataclass
class Answers:
    """One policy's answers to every prompt, and what they measure (one entry per prompt)."""

    texts: list[str]
    tokens: list[list[int]]
    """Sampled token ids, eos included where emitted."""
    ended: list[bool]
    scores: list[float] = field(default_factory=list)
    """r_θ(x, y) of the sampled tokens, read at the last one (eos when emitted), as PPO scores."""
    kl: list[float] = field(default_factory=list)
    """Σ_t log π(y_t|·) − log π_ref(y_t|·) over the answer's tokens."""


@torch.no_grad()
def answer_logprobs(model, queries: list[list[int]], tokens: list[list[int]], pad_id: int, temperature: float):
    """log π of each answer's tokens given its query, one padding-safe forward per call.

    Queries left-padded, answers right-padded, as PPO's rollouts: -> (B, R) log-probs, (B, R) mask.
    """
    q_ids, q_mask = pad_left(queries, pad_id)
    r_ids, r_mask = pad_right(tokens, pad_id)
    device = next(model.parameters()).device
    qr, am = torch.cat([q_ids, r_ids], 1).to(device), torch.cat([q_mask, r_mask], 1).to(device)
    logprobs, _ = policy_logprobs(model, qr, am, r_ids.shape[1], temperature)
    return logprobs, r_mask.to(device)


def sample_kl(policy, ref, queries, tokens, pad_id: int, temperature: float, batch_size: int) -> list[float]:
    """Per answer, Σ_t log π(y_t|x, y_<t) − log π_ref(y_t|x, y_<t) on the policy's own samples
    (the Monte-Carlo estimate of KL(π ‖ π_ref) that PPO's objective/kl logs)."""
    out = []
    for i in range(0, len(queries), batch_size):
        q, t = queries[i : i + batch_size], tokens[i : i + batch_size]
        logprobs, mask = answer_logprobs(policy, q, t, pad_id, temperature)
        ref_logprobs, _ = answer_logprobs(ref, q, t, pad_id, temperature)
        out += ((logprobs - ref_logprobs) * mask).sum(1).tolist()
    return out


def measure(policy, ref, rm, tokenizer, queries: list[list[int]], cfg: GenericEvalConfig) -> Answers:
    """Sample the policy's answers (seeded by run.seed), then their RM scores and KL."""
    out = generate(
        policy,
        tokenizer,
        queries,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        batch_size=cfg.batch_size,
        generator=generator_for(policy, cfg.run.seed),
    )
    answers = Answers(out.texts, out.tokens, out.ended)
    pad = tokenizer.pad_token_id
    answers.scores = score_sequences(rm, [q + t for q, t in zip(queries, out.tokens)], pad, cfg.batch_size)
    temperature = cfg.temperature or 1.0  # greedy: the models' own distributions
    answers.kl = sample_kl(policy, ref, queries, out.tokens, pad, temperature, cfg.batch_size)
    return answers


def mean_ci(xs: list[float], z: float = 1.96) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its normal 95% interval (one value: the point itself)."""
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, mean, mean
    half = z * math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n)
    return mean, mean - half, mean + half


def win_outcomes(scores: list[float], base: list[float]) -> list[float]:
    """Per prompt: 1 if the policy's answer scores above the baseline's, 0 below, 0.5 for a tie."""
    return [0.5 if a == b else float(a > b) for a, b in zip(scores, base, strict=True)]


def summarize(answers: dict[str, Answers], baseline: str) -> dict:
    """Every key of summary.json (module docstring) from each name's answers."""
    base, out = answers[baseline].scores, {}
    for name, a in answers.items():
        rate, lo, hi = win_rate(win_outcomes(a.scores, base))
        score, s_lo, s_hi = mean_ci(a.scores)
        kl, k_lo, k_hi = mean_ci(a.kl)
        out |= {
            f"rm/{name}/win_vs_{baseline}": rate,
            f"rm/{name}/win_vs_{baseline}_ci": [lo, hi],
            f"rm/{name}/score": score,
            f"rm/{name}/score_ci": [s_lo, s_hi],
            f"kl/{name}": kl,
            f"kl_ci/{name}": [k_lo, k_hi],
            f"length/{name}": sum(map(len, a.tokens)) / len(a.tokens),
            f"eos_rate/{name}": sum(a.ended) / len(a.ended),
        }
    out["n/prompts"] = len(base)
    return out


# --------------------------------------------------------------------------- the run


def evaluate(config: GenericEvalConfig) -> dict:
    """Every policy on the prompts; writes out_dir (nothing before every input is checked)
    and returns the summary (module docstring)."""
    validate(config)
    prompts, queries, tokenizer = read_inputs(config)
    set_seed(config.run.seed)
    device = resolve_device(config.run.device)
    ref = load_causal_lm(config.reference).to(device).eval()
    rm = load_reward_model(config.reward_model).to(device).eval()
    answers = {}
    for name, path in progress(list(config.entries().items()), desc="eval policies"):
        policy = ref if _same_dir(path, config.reference) else load_causal_lm(path).to(device).eval()
        answers[name] = measure(policy, ref, rm, tokenizer, queries, config)
        del policy
    summary = {k: _round(v) for k, v in summarize(answers, config.baseline_name()).items()}

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    rows = [
        {
            "index": i,
            "prompt": prompt_json(prompt),
            "policy": name,
            "response": a.texts[i],
            "score": _round(a.scores[i]),
            "kl": _round(a.kl[i]),
            "length": len(a.tokens[i]),
            "ended": a.ended[i],
        }
        for i, prompt in enumerate(prompts)
        for name, a in answers.items()
    ]
    write_jsonl(out / "samples.jsonl", rows)
    write_json(out / "summary.json", summary)  # last: the mark of a finished eval
    return summary


def prompt_json(prompt):
    """A prompt as samples.jsonl holds it: a string, or a conversation as [{"role", "content"}, ...]."""
    if isinstance(prompt, str):
        return prompt
    return [{"role": m.role, "content": m.content} for m in prompt]


def _round(v):
    if isinstance(v, list):
        return [_round(x) for x in v]
    return round(v, 6) if isinstance(v, float) else v


# --------------------------------------------------------------------------- CLI


def policies_override(item: str) -> str:
    """The command line's `policies=a=DIR,b=DIR` as the mapping it means; any other
    override (a YAML mapping `policies={a: DIR}` too) unchanged."""
    key, _, value = item.partition("=")
    if key != "policies" or value.lstrip().startswith("{"):
        return item
    pairs = [p.partition("=") for p in value.split(",") if p.strip()]
    names = [n.strip() for n, _, _ in pairs]
    if not pairs or any(not sep or not n.strip() or not d.strip() for n, sep, d in pairs):
        raise ConfigError(f"write name=DIR,name=DIR (got {value!r})", field="policies")
    if len(set(names)) != len(names):
        raise ConfigError(f"a policy name is given twice (got {value!r})", field="policies")
    return "policies=" + json.dumps({n.strip(): d.strip() for n, _, d in pairs})


def format_table(summary: dict, cfg: GenericEvalConfig) -> str:
    base = cfg.baseline_name()
    lines = [f"{'policy':<20} {f'RM win rate vs {base}':>26} {'RM score':>9} {'KL':>8} {'length':>7} {'eos':>5}"]
    for name in cfg.entries():
        lo, hi = summary[f"rm/{name}/win_vs_{base}_ci"]
        win = f"{summary[f'rm/{name}/win_vs_{base}']:.2f} [{lo:.2f}, {hi:.2f}]"
        lines.append(
            f"{name:<20} {win:>26} {summary[f'rm/{name}/score']:>9.3f} {summary[f'kl/{name}']:>8.3f} "
            f"{summary[f'length/{name}']:>7.1f} {summary[f'eos_rate/{name}']:>5.2f}"
        )
    return "\n".join(lines)


def run_cli(args) -> int:
    """`rlhflab eval` without a world (rlhflab.eval.evaluate dispatches here): evaluate, then
    write <out_dir>/report.html."""
    from rlhflab.report.sections import write_report

    args.overrides = [policies_override(o) for o in args.overrides]
    cfg = config_from_args(GenericEvalConfig, args)
    summary = evaluate(cfg)
    report = write_report(cfg.out_dir)
    print(format_table(summary, cfg))
    print(f"judged by {cfg.reward_model}; KL to {cfg.reference}; {summary['n/prompts']} prompts -> {report}")
    return 0
