"""`rlhflab eval` without the lab world: RM win rates, KL to the reference, the CLI and its report."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from rlhflab.cli import main
from rlhflab.errors import ConfigError
from rlhflab.eval.generic import (
    Answers,
    GenericEvalConfig,
    evaluate,
    mean_ci,
    policies_override,
    sample_kl,
    summarize,
    win_outcomes,
)
from rlhflab.eval.judging import wilson
from rlhflab.models import load_causal_lm, load_reward_model
from rlhflab.report.sections import write_report
from rlhflab.text import encode_query, train_tokenizer

from tiny import gpt2_dir, make, tiny_tokenizer, write_jsonl

PROMPTS = ["name a color", "the cat sat on", "summarize this : birds fly south", "one two three", "yes no", "a dog"] * 4
MAX_NEW = 8
EOS = 2


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """Two policies of different seeds, a copy of the first (the reference), an RM, prompts."""
    root = tmp_path_factory.mktemp("generic")
    tok = tiny_tokenizer()
    a, b = gpt2_dir(root / "a", tok, seed=0), gpt2_dir(root / "b", tok, seed=1)
    shutil.copytree(a, root / "ref")
    torch.manual_seed(3)  # the RM's fresh head
    load_reward_model(a).save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    return {"a": a, "b": b, "ref": root / "ref", "rm": root / "rm", "prompts": prompts, "root": root}


def config(dirs, out: Path, **kw) -> GenericEvalConfig:
    defaults = {
        "policies": {"a": str(dirs["a"]), "b": str(dirs["b"])},
        "reference": str(dirs["ref"]),
        "prompts": str(dirs["prompts"]),
        "reward_model": str(dirs["rm"]),
        "max_new_tokens": MAX_NEW,
        "batch_size": 4,  # several batches of uneven answers: padding inside the KL forwards
        "out_dir": str(out),
        "device": "cpu",
    }
    return make(GenericEvalConfig, **{**defaults, **kw})


@pytest.fixture(scope="module")
def result(dirs):
    out = dirs["root"] / "eval"
    return evaluate(config(dirs, out)), out


def test_a_copy_of_the_reference_ties_it_and_has_kl_zero(result):
    s, _ = result
    # The reference is no listed policy's directory, so it is evaluated as 'reference' and is
    # the baseline; `a` has its weights and seed: the same samples, every prompt a tie.
    assert s["rm/a/win_vs_reference"] == 0.5 and s["rm/reference/win_vs_reference"] == 0.5
    assert s["kl/a"] == 0.0 and s["kl_ci/a"] == [0.0, 0.0] and s["kl/reference"] == 0.0
    assert s["rm/a/score"] == s["rm/reference/score"] and s["length/a"] == s["length/reference"]
    lo, hi = s["rm/a/win_vs_reference_ci"]
    assert 0 < lo < 0.5 < hi < 1 and s["n/prompts"] == len(PROMPTS)


def test_another_policy_has_positive_kl_and_its_own_scores(result):
    s, out = result
    assert s["kl/b"] > 0 and s["kl_ci/b"][0] < s["kl/b"] < s["kl_ci/b"][1]
    assert 0 <= s["rm/b/win_vs_reference"] <= 1 and s["rm/b/score"] != s["rm/a/score"]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * len(PROMPTS) and {r["policy"] for r in rows} == {"a", "b", "reference"}
    b = [r for r in rows if r["policy"] == "b"]
    assert s["rm/b/score"] == pytest.approx(sum(r["score"] for r in b) / len(b), abs=1e-5)
    assert s["kl/b"] == pytest.approx(sum(r["kl"] for r in b) / len(b), abs=1e-5)
    assert s["length/b"] == sum(r["length"] for r in b) / len(b) and all(1 <= r["length"] <= MAX_NEW for r in b)
    assert s["eos_rate/b"] == sum(r["ended"] for r in b) / len(b)
    assert [r["prompt"] for r in b] == PROMPTS and json.loads((out / "summary.json").read_text()) == s


def test_the_batched_kl_equals_an_unpadded_forward_per_answer(dirs):
    """KL through the padded batch (left-padded queries, right-padded answers) matches the
    sum of log-ratios of each answer computed alone, with no padding at all."""
    tok = tiny_tokenizer()
    pi, ref = load_causal_lm(dirs["b"]).eval(), load_causal_lm(dirs["a"]).eval()
    queries = [encode_query(tok, p) for p in PROMPTS[:3]]
    answers = [[5, 9, 12], [7], [30, 31, 32, 33, tok.eos_token_id]]
    batched = sample_kl(pi, ref, queries, answers, tok.pad_token_id, 1.0, batch_size=3)
    for q, a, kl in zip(queries, answers, batched):
        ids = torch.tensor([q + a])
        with torch.no_grad():
            lp = [torch.log_softmax(m(ids).logits[0, len(q) - 1 : -1], -1) for m in (pi, ref)]
        want = sum(float(lp[0][t, y] - lp[1][t, y]) for t, y in enumerate(a))
        assert kl == pytest.approx(want, abs=1e-4)


def test_one_turn_conversations_are_answered_as_the_string_prompts(dirs, result, tmp_path):
    """The lab tokenizer's chat template renders a one-turn conversation as the string layout."""
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS])
    s = evaluate(config(dirs, tmp_path / "out", prompts=str(chat)))
    assert s == result[0]
    row = json.loads((tmp_path / "out" / "samples.jsonl").read_text().splitlines()[0])
    assert row["prompt"] == [{"role": "user", "content": PROMPTS[0]}]


def test_the_policy_that_is_the_reference_is_the_default_baseline(dirs, tmp_path):
    cfg = config(dirs, tmp_path / "out", reference=str(dirs["a"]), n_prompts=12)
    assert cfg.baseline_name() == "a" and list(cfg.entries()) == ["a", "b"]
    s = evaluate(cfg)
    assert s["rm/a/win_vs_a"] == 0.5 and s["kl/a"] == 0.0 and s["kl/b"] > 0 and s["n/prompts"] == 12
    assert "rm/reference/score" not in s
    assert make(GenericEvalConfig, **{**vars(cfg), "baseline": "b"}).baseline_name() == "b"


def test_summary_keys_from_hand_made_answers():
    answers = {
        "p": Answers(["x", "y"], [[4, 5, EOS], [4, 5, 6, 7]], [True, False], scores=[1.0, 0.0], kl=[0.5, 1.5]),
        "q": Answers(["x", "z"], [[4, 5, EOS], [9]], [True, True], scores=[1.0, 2.0], kl=[0.0, 0.0]),
    }
    s = summarize(answers, "q")
    assert s["rm/p/win_vs_q"] == 0.25 and s["rm/q/win_vs_q"] == 0.5 and s["n/prompts"] == 2
    assert s["rm/p/win_vs_q_ci"] == list(wilson(0.5, 2)) and s["kl/p"] == 1.0 and s["kl_ci/q"] == [0.0, 0.0]
    assert (s["length/p"], s["length/q"], s["eos_rate/p"], s["eos_rate/q"]) == (3.5, 2.0, 0.5, 1.0)
    assert s["rm/q/score"] == 1.5 and s["rm/q/score_ci"][0] < 1.5 < s["rm/q/score_ci"][1]


def test_pure_helpers():
    assert win_outcomes([1.0, 0.0, 2.0], [0.5, 0.0, 3.0]) == [1.0, 0.5, 0.0]
    mean, lo, hi = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and hi - mean == pytest.approx(1.96 * (5 / 3) ** 0.5 / 2) and mean - lo == hi - mean
    assert mean_ci([2.0]) == (2.0, 2.0, 2.0)
    assert policies_override("policies=sft=runs/s,ppo=/x/p") == 'policies={"sft": "runs/s", "ppo": "/x/p"}'
    assert policies_override("policies={a: b}") == "policies={a: b}" and policies_override("x=1") == "x=1"
    for bad in ("policies=sft", "policies=a=x,a=y", "policies==x"):
        with pytest.raises(ConfigError):
            policies_override(bad)


def test_config_refuses_bad_fields(dirs, tmp_path):
    for kw, key in (
        ({"baseline": "c"}, "baseline"),
        ({"policies": {}}, "policies"),
        ({"policies": {"a/b": "x"}}, "policies"),
        ({"policies": {"reference": "elsewhere"}}, "policies.reference"),
        ({"temperature": -1.0}, "temperature"),
    ):
        with pytest.raises(ConfigError) as e:
            evaluate(config(dirs, tmp_path / "out", **kw))
        assert e.value.field == key
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the command line


def argv(dirs, out: Path, **kw) -> list[str]:
    args = {
        "policies": f"a={dirs['a']},b={dirs['b']}",
        "prompts": dirs["prompts"],
        "reward_model": dirs["rm"],
        "reference": dirs["a"],
        "out_dir": out,
        "max_new_tokens": MAX_NEW,
        "run.device": "cpu",
        **kw,
    }
    return ["eval"] + [x for k, v in args.items() for x in (f"--{k}", str(v))]


class Page(HTMLParser):
    """Tags, table cells and image sources of a page (and whether every tag closed)."""

    def __init__(self, html: str):
        super().__init__()
        self.tags, self.cells, self.imgs, self.text, self._cell = [], [], [], [], None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        if tag == "td":
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "td":
            self.cells.append(self._cell)
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell += data


@pytest.fixture(scope="module")
def cli_out(dirs):
    out = dirs["root"] / "cli"
    assert main(argv(dirs, out, samples_shown=3)) == 0
    return out


def test_cli_without_a_world_writes_summary_samples_and_report(cli_out):
    s = json.loads((cli_out / "summary.json").read_text())
    assert s["rm/a/win_vs_a"] == 0.5 and s["kl/a"] == 0.0 and s["kl/b"] > 0
    assert len((cli_out / "samples.jsonl").read_text().splitlines()) == 2 * len(PROMPTS)
    page = Page((cli_out / "report.html").read_text())
    text = " ".join(page.text)
    assert "RM win rate vs a" in text and "Not shown" not in text and "could not be drawn" not in text
    assert "lab world" in text and "Likert" not in text and "alignment tax" not in text  # no lab section
    assert page.cells.count("a") == page.cells.count("b") == 1 + 3  # a row in the table, one per prompt shown
    b_row = page.cells[page.cells.index("b") : page.cells.index("b") + 6]
    lo, hi = s["rm/b/win_vs_a_ci"]
    assert b_row[1] == f"{s['rm/b/win_vs_a']:.3f} [{lo:.3f}, {hi:.3f}]" and b_row[3].startswith(f"{s['kl/b']:.3f}")
    assert len(page.imgs) == 1 and page.imgs[0].startswith("data:image/png;base64,")
    assert text.count("prompt ") >= 3 and "prompt 3" not in text  # samples_shown prompts


def test_report_command_renders_the_eval_dir(cli_out, tmp_path):
    assert main(["report", str(cli_out), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_text() == (cli_out / "report.html").read_text()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text(json.dumps({"rm/a/win_vs_a": 0.5}))
    (tmp_path / "broken" / "samples.jsonl").write_text("not json\n[1]\n")
    html = write_report(tmp_path / "broken").read_text()
    assert "samples.jsonl is missing or has no rows" in html and html.rstrip().endswith("</html>")


def test_report_renders_in_a_browser(cli_out, browser):
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((cli_out / "report.html").as_uri())
    widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
    assert widths and all(w > 0 for w in widths) and errors == []
    page.close()


def _bad_vocab_dir(path: Path) -> Path:
    return gpt2_dir(path, train_tokenizer(["other words entirely"] * 4, vocab_size=280))


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_policy", "no config.json"),
        ("bad_json", "prompts.jsonl:2: not valid JSON"),
        ("no_prompt_field", "prompts.jsonl:1: field 'prompt': missing"),
        ("too_long", "prompts.jsonl:2: field 'prompt': prompt is"),
        ("other_vocab", "field 'policies.b': its tokenizer differs"),
        ("lab_key", "field 'models': a lab-world key"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(dirs, tmp_path, capsys, case, message):
    out, kw = tmp_path / "out", {}
    prompts = tmp_path / "prompts.jsonl"
    if case == "missing_policy":
        kw["policies"] = f"a={dirs['a']},b={tmp_path / 'nope'}"
    elif case == "bad_json":
        prompts.write_text('{"prompt": "ok"}\n{"prompt": \n')
    elif case == "no_prompt_field":
        prompts.write_text('{"text": "ok"}\n')
    elif case == "too_long":
        prompts.write_text('{"prompt": "ok"}\n' + json.dumps({"prompt": "the cat sat on the mat . " * 40}) + "\n")
    elif case == "other_vocab":
        kw["policies"] = f"a={dirs['a']},b={_bad_vocab_dir(tmp_path / 'other')}"
    elif case == "lab_key":
        kw["models"] = "{x: y}"
    if prompts.exists():
        kw["prompts"] = prompts
    assert main(argv(dirs, out, **kw)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_help_says_which_mode_needs_what(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "without a world" in out and "--policies name=DIR,name=DIR" in out and "\n  reference = ''\n" in out
    assert "\n  world = ''\n" in out  # the lab keys are still listed
    assert main(["eval", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "Lab world directory" in out and "Reference policy directory" in out


def test_a_world_still_picks_the_lab_evaluation(tmp_path, capsys):
    code = main(["eval", "--world", str(tmp_path / "no-world"), "--models", "{a: x}", "--baseline", "a"])
    assert code == 2 and "policies" not in capsys.readouterr().err
