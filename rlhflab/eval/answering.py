"""The eval's answering: every model's answers, held-out answers and capability items.

`answer_all` runs the models of an `EvalConfig` side by side (training.side_by_side); what
comes back is judged by evaluate.py. A model's results can also be computed before the eval
by `answer_stage` (`rlhflab run` answers each model as soon as its stage and the RM have
finished, beside the stages still running) and kept in `<dir>/<name>/summary.json`; an eval whose
`answers_from` is `dir` takes them from there when their key matches: the same weights, world,
settings, device and intra-op thread count that it would answer with itself, so the results
are the ones it would compute (tests/test_evaluate.py checks every output file is the same
byte for byte). Any other file there is ignored and the model answered again.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rlhflab.config import flat_dict
from rlhflab.data import iter_jsonl
from rlhflab.eval.capability import capability_items, few_shot, load_benchmarks, scores_of
from rlhflab.eval.config import EvalConfig
from rlhflab.eval.heldout import HeldoutAnswers, HeldoutSets, answer_heldout
from rlhflab.eval.prompted import choose_prefix, prompted_name, with_prefix
from rlhflab.generation import generate, generator_for
from rlhflab.io import write_json
from rlhflab.models import context_length, load_causal_lm, load_reward_model, load_tokenizer, n_params
from rlhflab.stages.rm_score import score_pairs
from rlhflab.text import encode_query
from rlhflab.training import default_jobs, resolve_device, set_seed, side_by_side, side_by_side_threads

SPLITS = ("test",)
"""Splits judged by the gold scorer; the held-out sets are rlhflab.eval.heldout's."""

KEY_FREE = (
    "out_dir",
    "models",
    "capability_models",
    "prompted",
    "baseline",
    "head_to_head",
    "rl_runs",
    "best_of_n",
    "best_of_n_policy",
    "best_of_n_prompts",
    "answers_from",
    "jobs",
    "world",
    "reward_model",
    "run.device",
    "run.report_to",
)
"""EvalConfig fields a model's answers do not depend on, or that the key covers otherwise
(world and reward_model by their files' digest, jobs by the thread count, the device by its name)."""


def build_queries(
    tokenizer, prompts: list[str], n_pos: int | None, max_new_tokens: int, prefix: list[list[int]] = ()
) -> list[list[int]]:
    """Query ids per prompt; with a few-shot prefix, prefix and prompt make one document
    (prompted.with_prefix: whole shots dropped, oldest first, to fit the context n_pos; None:
    no limit). A prompt still too long is cut by `generate(fit_context=True)`."""
    bos = tokenizer.bos_token_id
    return [with_prefix(prefix, encode_query(tokenizer, p), n_pos, max_new_tokens, bos) for p in prompts]


def answer(model, tokenizer, queries: list[list[int]], cfg: EvalConfig):
    """Every answer of the eval: batched, greedy at temperature 0, fitted to the context."""
    return generate(
        model,
        tokenizer,
        queries,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        batch_size=cfg.batch_size,
        generator=generator_for(model, cfg.run.seed),
        fit_context=True,
    ).texts


@dataclass
class Inputs:
    """What every model answers, read from the world once: the test tasks and prompts (and the
    validation prompts a prompted model's prefix is chosen on), demonstrations for prefixes,
    the capability benchmarks and the held-out sets."""

    tasks: dict
    prompts: dict
    demos: list[dict]
    bench: dict
    sets: HeldoutSets

    @classmethod
    def of(cls, cfg: EvalConfig, world) -> Inputs:
        limit = cfg.n_prompts or None
        tasks = {s: world.splits[s][:limit] for s in SPLITS}
        prompts = {s: [t.prompt for t in ts] for s, ts in tasks.items()}
        prompts["prefix"] = [t.prompt for t in world.splits["ppo_val"][: cfg.prefix_prompts]] if cfg.prompted else []
        demos = [obj for _, obj in iter_jsonl(Path(cfg.world) / "sft_train.jsonl")] if cfg.prompted else []
        bench = load_benchmarks(cfg.world, limit=cfg.capability_items or None)
        return cls(tasks, prompts, demos, bench, HeldoutSets.of(world, limit))


@dataclass
class Answered:
    """One model's results: `answers` variant -> split -> texts, `held` variant -> its
    held-out answers, `summary` its keys (params, capability) and the raw `_items`/`_prefix`
    entries evaluate() turns into tax and prefix keys."""

    answers: dict
    summary: dict
    held: dict

    def to_json(self) -> dict:
        held = {v: asdict(h) for v, h in self.held.items()}
        return {"variants": list(self.answers), "answers": self.answers, "summary": self.summary, "held": held}

    @classmethod
    def from_json(cls, obj: dict) -> Answered:
        """The inverse of to_json: JSON's lists back to the tuples the results hold, the
        variants in their own order (the model, then its prompted variant), not the file's."""
        summary = dict(obj["summary"])
        for k in [k for k in summary if k.startswith(("_items/", "_items_fewshot/"))]:
            summary[k] = {b: (v[0], v[1]) for b, v in summary[k].items()}
        held = {
            v: HeldoutAnswers(
                truthful=h["truthful"],
                truthful_mc={k: [tuple(p) for p in ps] for k, ps in h["truthful_mc"].items()},
                toxicity=h["toxicity"],
                bias=[tuple(p) for p in h["bias"]],
            )
            for v, h in obj["held"].items()
        }
        order = obj["variants"]
        return cls({v: obj["answers"][v] for v in order}, summary, {v: held[v] for v in order if v in held})


def _answer_model(cfg: EvalConfig, name: str, path: str, inputs: Inputs, device) -> Answered:
    """One model (and its prompted variant) answers every split and the held-out sets; its capability."""
    answers, summary, held = {}, {}, {}
    tok = load_tokenizer(path)
    model = load_causal_lm(path).to(device).eval()
    n_pos = context_length(model.config)
    variants = [(name, [])]
    if name in cfg.prompted:
        variant = prompted_name(name)
        prefix, shots, means = _prefix_for(cfg, model, tok, n_pos, inputs.demos, inputs.prompts["prefix"], device)
        variants.append((variant, prefix))
        summary[f"_prefix/{variant}"] = {"shots": shots, "rm_of_candidates": means}
    for variant, prefix in variants:
        answers[variant] = {
            s: answer(model, tok, build_queries(tok, inputs.prompts[s], n_pos, cfg.max_new_tokens, prefix), cfg)
            for s in SPLITS
        }
        held[variant] = answer_heldout(
            model,
            tok,
            inputs.sets,
            prefix=prefix,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            seed=cfg.run.seed,
            batch_size=cfg.batch_size,
        )
        summary[f"params/{variant}"] = n_params(model)
    # A prompt prefix does not change the weights, so capability is measured once per model.
    summary.update(_capability_items(cfg, name, model, tok, inputs.bench))
    summary.update({f"capability/{k}/{name}": v for k, v in scores_of(summary[f"_items/{name}"]).items()})
    return Answered(answers, summary, held)


def _capability_items(cfg: EvalConfig, name: str, model, tok, bench: dict) -> dict:
    """The model's items, zero-shot (`_items/<name>`) and few-shot (`_items_fewshot/<name>`)."""
    out = {f"_items/{name}": capability_items(model, tok, bench)}
    if cfg.capability_shots:
        fewshot = few_shot(bench, cfg.capability_shots, tok, context_length(model.config))
        out[f"_items_fewshot/{name}"] = capability_items(model, tok, fewshot)
    return out


def _capability_model(cfg: EvalConfig, name: str, path: str, inputs: Inputs, device) -> Answered:
    """A model of `capability_models`: its capability items and nothing else."""
    model = load_causal_lm(path).to(device).eval()
    return Answered({}, _capability_items(cfg, name, model, load_tokenizer(path), inputs.bench), {})


def _prefix_for(cfg: EvalConfig, model, tok, n_pos, demos: list[dict], prompts: list[str], device):
    """The few-shot prefix of a prompted model: the candidate the reward model likes best
    on validation prompts (prompted.choose_prefix)."""
    score_fn = None
    if cfg.reward_model and cfg.prefix_candidates > 1:
        set_seed(cfg.run.seed)  # as evaluate() loads it (an LM directory's score head is drawn)
        rm, rm_tok = load_reward_model(cfg.reward_model).to(device).eval(), load_tokenizer(cfg.reward_model)

        def score_fn(ps, answers):
            return score_pairs(rm, rm_tok, ps, answers, cfg.batch_size)

    def answer_fn(prefix, ps):
        return answer(model, tok, build_queries(tok, ps, n_pos, cfg.max_new_tokens, prefix), cfg)

    seed = cfg.run.seed
    return choose_prefix(answer_fn, score_fn, tok, demos, prompts, cfg.prefix_shots, cfg.prefix_candidates, seed)


ANSWER = {"answers": _answer_model, "capability": _capability_model}
"""What each kind of model gets: everything (`models`), or capability only (`capability_models`)."""


def _calls(cfg: EvalConfig) -> list[tuple[str, str, str]]:
    """(kind, name, path) of every model the eval answers, in the order of the config."""
    out = [("answers", n, p) for n, p in cfg.models.items()]
    return out + [("capability", n, p) for n, p in cfg.capability_models.items()]


def _run(cfg: EvalConfig, kind: str, name: str, path: str, inputs: Inputs, device) -> Answered:
    return ANSWER[kind](cfg, name, path, inputs, device)


def tree_digest(path: str) -> str:
    """sha256 over the relative paths and bytes of every file under `path` (or of the file)."""
    root, h = Path(path), hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for p in files:
        h.update(str(p.relative_to(root) if root.is_dir() else p.name).encode() + b"\0")
        with p.open("rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def answers_key(cfg: EvalConfig, kind: str, name: str, path: str, threads: int, device) -> str:
    """What a model's results depend on, hashed: its weights, the world, the settings that
    change answers, the device and the thread count (and for a prompted model the reward
    model that picks its prefix)."""
    settings = {k: v for k, v in flat_dict(cfg).items() if k not in KEY_FREE and k.split(".")[0] not in KEY_FREE}
    parts = {
        "kind": kind,
        "name": name,
        "prompted": name in cfg.prompted,
        "settings": settings,
        "weights": tree_digest(str(path)),
        "world": tree_digest(cfg.world),
        "reward_model": tree_digest(cfg.reward_model) if cfg.reward_model and name in cfg.prompted else "",
        "device": str(device),
        "threads": threads,
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _kept(cfg: EvalConfig, kind: str, name: str, path: str, threads: int, device) -> Answered | None:
    """A model's results from `answers_from` when their key is this eval's, else None."""
    file = Path(cfg.answers_from) / name / "summary.json"
    if not cfg.answers_from or not file.is_file():
        return None
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        obj = None
    if not isinstance(obj, dict) or obj.get("key") != answers_key(cfg, kind, name, path, threads, device):
        print(f"eval: {file} is not for these weights and settings; answering {name} again", file=sys.stderr)
        return None
    return Answered.from_json(obj)


def answer_all(cfg: EvalConfig, inputs: Inputs, device) -> dict[str, Answered]:
    """Every model's results by name: kept ones from `answers_from`, the rest answered
    `jobs` models at a time in one-thread processes of their own (training.side_by_side); in
    this process when jobs is 1."""
    calls, jobs = _calls(cfg), cfg.jobs or default_jobs(device)
    threads = side_by_side_threads(jobs)  # what each model is answered with here
    out = {name: _kept(cfg, kind, name, path, threads, device) for kind, name, path in calls}
    todo = [(cfg, kind, name, path, inputs, device) for kind, name, path in calls if out[name] is None]
    kept = f", {len(calls) - len(todo)} answered already ({cfg.answers_from})" if len(todo) < len(calls) else ""
    print(f"eval: {len(todo)} models to answer, {min(jobs, max(1, len(todo)))} at a time{kept}", file=sys.stderr)
    for args, result in zip(todo, side_by_side(_run, todo, jobs)):
        out[args[2]] = result
    return out


def answer_stage(cfg: EvalConfig, name: str, out_dir: str) -> dict:
    """One model's results ahead of the eval, in `out_dir`/summary.json with their key (in
    this process, at its own thread count): `rlhflab run` runs one per evaluated model."""
    from rlhflab.world import load_world

    kind = "answers" if name in cfg.models else "capability"
    path = cfg.models.get(name) or cfg.capability_models[name]
    device = resolve_device(cfg.run.device)
    set_seed(cfg.run.seed)
    result = _run(cfg, kind, name, path, Inputs.of(cfg, load_world(cfg.world)), device)
    key = answers_key(cfg, kind, name, path, torch.get_num_threads(), device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", {"key": key, "model": name, **result.to_json()})
    return {"model": name, "key": key}
