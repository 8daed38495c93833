"""The sampler: no deprecated transformers API, the KV cache equals a full forward, one
batched entry point (`generate`) whose every seeded generator is made on the model's device."""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

from rlhflab import generation
from rlhflab.generation import generate, sample
from rlhflab.models import load_causal_lm, load_reward_model, load_tokenizer
from rlhflab.text import encode_query

from tiny import gpt2_dir, llama_dir, make, tiny_tokenizer, write_jsonl

PROMPTS = ["say cat", "name a color", "summarize this : birds fly south in winter"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("generation")
    tok = tiny_tokenizer()
    return {"tok": tok, "gpt2": gpt2_dir(d / "gpt2", tok), "llama": llama_dir(d / "llama", tok)}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sampling_uses_no_deprecated_transformers_api(models, arch):
    model, tok = load_causal_lm(models[arch]), models["tok"]
    queries = [encode_query(tok, p) for p in PROMPTS]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        sample(
            model,
            queries,
            pad_id=tok.pad_token_id,
            eos_id=tok.eos_token_id,
            max_new_tokens=4,
            generator=torch.Generator().manual_seed(0),
        )
        generate(model, tok, queries, max_new_tokens=4, temperature=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cached_greedy_decoding_equals_full_forward_argmax(models, arch):
    """Left-padded, KV-cached, batched greedy tokens = argmax of a plain forward of each row alone."""
    model, tok = load_causal_lm(models[arch]).eval(), models["tok"]
    queries = [encode_query(tok, p) for p in PROMPTS]
    gen = sample(
        model,
        queries,
        pad_id=tok.pad_token_id,
        eos_id=tok.eos_token_id,
        max_new_tokens=8,
        greedy=True,
        force_length=True,
    )
    with torch.no_grad():
        for q, row in zip(queries, gen.responses.tolist()):
            ids = list(q)
            for t in row:
                logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
                logits[tok.eos_token_id] = float("-inf")  # force_length, as the sampler
                assert int(logits.argmax()) == t
                ids.append(t)


def test_generate_fits_the_context_only_when_asked(models):
    model, tok = load_causal_lm(models["gpt2"]), models["tok"]  # context 128
    long, short = encode_query(tok, "the cat sat on the mat " * 40), encode_query(tok, "say cat")
    assert len(long) > 128
    out = generate(model, tok, [long, short], max_new_tokens=16, temperature=0, batch_size=2, fit_context=True)
    assert out.queries == [long[-(128 - generation.CONTEXT_MARGIN) :], short]
    assert max(map(len, out.tokens)) <= generation.CONTEXT_MARGIN  # the room the longest query leaves
    alone = generate(model, tok, [short], max_new_tokens=16, temperature=0)
    assert alone.queries == [short] and len(alone.tokens[0]) <= 16
    assert len(out.texts) == len(out.ended) == 2 and model.training is False


# --------------------------------------------------------------------------- generator devices


class _Recorder(torch.Generator):
    """torch.Generator that remembers the device it was asked for (None: none given)."""

    made: list = []

    def __init__(self, device=None):  # torch.Generator's own setup happens in __new__
        _Recorder.made.append((self, device))


@pytest.fixture
def sampler_calls(monkeypatch):
    """Every `sample` call from every caller: (caller, model device, generator's requested device)."""
    calls, caller = [], ["?"]
    real = generation.sample
    _Recorder.made = []

    def spy(model, queries, **kw):
        g = kw.get("generator")
        asked = None if g is None else next((d for made, d in _Recorder.made if made is g), "not recorded")
        calls.append((caller[0], next(model.parameters()).device, g is not None, asked))
        return real(model, queries, **kw)

    monkeypatch.setattr(torch, "Generator", _Recorder)
    for mod in list(sys.modules.values()):  # wherever the sampler was imported by name
        if getattr(mod, "__name__", "").startswith("rlhflab") and getattr(mod, "sample", None) is real:
            monkeypatch.setattr(mod, "sample", spy)
    return calls, caller


def test_every_generator_is_made_on_the_models_device(sampler_calls, tmp_path):
    """On a GPU a generator made on the CPU raises at the first draw; here (CPU only) the
    check is that every generator handed to the sampler was asked for the model's device."""
    from rlhflab.eval.capability import capability_scores, load_benchmarks
    from rlhflab.eval.config import EvalConfig
    from rlhflab.eval.evaluate import evaluate
    from rlhflab.eval.lab import gold_of_policy, make_lab_evaluator
    from rlhflab.models import lab_model
    from rlhflab.report.walkthrough import ppo_episode
    from rlhflab.stages import sample as sample_stage
    from rlhflab.stages.sft import rm_score
    from rlhflab.world import load_world
    from rlhflab.world.build import build

    calls, caller = sampler_calls
    build(tmp_path / "world", 0, "small", vocab_size=400)
    tok = load_tokenizer(tmp_path / "world" / "tokenizer")
    for i, name in enumerate(["SFT-small", "PPO-small"]):
        lab_model("small", tok, n_positions=128, seed=i).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    torch.manual_seed(0)
    load_reward_model(tmp_path / "SFT-small").save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    world = load_world(tmp_path / "world")
    prompts = [t.prompt for t in world.splits["test"][:3]]
    policy = load_causal_lm(tmp_path / "SFT-small")
    rm = load_reward_model(tmp_path / "rm").eval()

    caller[0] = "lab evaluator"
    make_lab_evaluator(str(tmp_path / "world"), prompts, 6, 1.0, capability_items=2)(policy, tok)
    caller[0] = "gold_of_policy"
    gold_of_policy(policy, tok, world, prompts, 6, greedy=False)
    caller[0] = "eval"  # its answers, best-of-n and capability
    evaluate(
        make(
            EvalConfig,
            world=str(tmp_path / "world"),
            models={"SFT-small": str(tmp_path / "SFT-small")},
            reward_model=str(tmp_path / "rm"),
            n_prompts=2,
            max_new_tokens=6,
            temperature=1.0,
            capability_items=2,
            best_of_n=[1, 2],
            best_of_n_prompts=2,
            out_dir=str(tmp_path / "eval"),
        )
    )
    caller[0] = "sample stage"
    sample_stage.run(
        make(
            sample_stage.SampleConfig,
            policy=str(tmp_path / "SFT-small"),
            max_new_tokens=6,
            prompts=str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in prompts])),
            out=str(tmp_path / "samples.jsonl"),
            k_min=2,
            k_max=2,
        )
    )
    caller[0] = "sft rm choice"
    cfg = types.SimpleNamespace(
        run=types.SimpleNamespace(seed=0), val_temperature=1.0, val_max_new_tokens=6, eval_batch_size=4
    )
    rm_score(policy, tok, prompts, rm, tok, cfg)
    caller[0] = "walkthrough"
    ppo_episode(tmp_path / "PPO-small", tmp_path / "SFT-small", tmp_path / "rm", prompts[0], 0.1, 6)
    caller[0] = "capability"
    capability_scores(policy, tok, load_benchmarks(tmp_path / "world", limit=2))

    sampled = {"lab evaluator", "gold_of_policy", "eval", "sample stage", "sft rm choice", "walkthrough"}
    assert {c for c, *_ in calls} == sampled | {"capability"}
    assert {c for c, _, has_generator, _ in calls if has_generator} == sampled
    for who, device, has_generator, asked in calls:
        if has_generator:
            assert asked not in (None, "not recorded") and torch.device(asked) == device, (who, asked, device)


@pytest.mark.gpu
def test_seeded_generation_and_the_lab_measurement_run_on_cuda(models):
    """What the device check above stands in for on the CPU: on a GPU, seeded sampling and
    the lab's gold measurement (PPO's step-0 evaluation) run with the model on CUDA."""
    from rlhflab.eval.lab import gold_of_policy
    from rlhflab.generation import generator_for

    model, tok = load_causal_lm(models["gpt2"]).cuda(), models["tok"]
    queries = [encode_query(tok, p) for p in PROMPTS]
    a = generate(model, tok, queries, max_new_tokens=6, generator=generator_for(model, 3))
    b = generate(model, tok, queries, max_new_tokens=6, generator=generator_for(model, 3))
    assert a.tokens == b.tokens and len(a.texts) == len(PROMPTS)

    class World:  # the gold scorer's interface, enough for gold_of_policy
        def judge(self, prompt, response):
            return types.SimpleNamespace(
                quality=0.5,
                style="Helpful",
                followed=True,
                hallucination=False,
                toxic=False,
                n_words=len(response.split()),
            )

    assert gold_of_policy(model, tok, World(), PROMPTS, max_new_tokens=6, greedy=False)["gold"] == 0.5
