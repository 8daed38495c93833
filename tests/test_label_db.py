"""The labeling store: loading, assignment, validation, agreement, export, CLI."""

from __future__ import annotations

import json
import sqlite3

import pytest

from rlhflab.cli import main
from rlhflab.data import pair_agreement, read_demos, read_rankings
from rlhflab.errors import InputError
from rlhflab.label.db import LabelConflict, LabelDB, agreement, hash_token, validate_label


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def db(tmp_path):
    d = LabelDB(tmp_path / "labels.db")
    yield d
    d.close()


def samples(n, k=4):
    return [{"prompt": f"prompt {i}", "responses": [f"r{i}.{j}" for j in range(k)], "model": "sft"} for i in range(n)]


def count(db, table):
    with db.read() as c:
        return c.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_pair_agreement_by_hand():
    assert pair_agreement([0, 1, 2], [0, 1, 2]) == (3, 3)
    # (0,1) and (0,2) agree, (1,2) flips.
    assert pair_agreement([0, 1, 2], [0, 2, 1]) == (2, 3)
    # 1 and 2 tied in the first ranking: that pair is not compared.
    assert pair_agreement([0, [1, 2]], [0, 2, 1]) == (2, 2)
    assert pair_agreement([[0, 1]], [1, 0]) == (0, 0)


def test_agreement_means_per_pair_and_overall():
    by_item = {
        1: {"ann": [0, 1, 2], "bob": [0, 2, 1], "cy": [0, 1, 2]},  # ann~bob 2/3, ann~cy 1, bob~cy 2/3
        2: {"ann": [1, 0], "bob": [1, 0]},  # ann~bob 1
        3: {"cy": [0, 1]},  # nobody to compare with
    }
    out = agreement(by_item)
    pairs = {(p["a"], p["b"]): (p["items"], p["agreement"]) for p in out["pairs"]}
    assert pairs[("ann", "bob")] == (2, pytest.approx((2 / 3 + 1) / 2))
    assert pairs[("ann", "cy")] == (1, pytest.approx(1.0))
    assert pairs[("bob", "cy")] == (1, pytest.approx(2 / 3))
    assert out["comparisons"] == 4
    assert out["overall"] == pytest.approx((2 / 3 + 1 + 2 / 3 + 1) / 4)
    assert agreement({})["overall"] is None


def test_load_spreads_items_evenly_and_every_item_gets_distinct_labelers(db, tmp_path):
    for name in ("a", "b", "c", "d"):
        db.add_labeler(name)
    added, skipped = db.load("rank", write_jsonl(tmp_path / "s.jsonl", samples(10)), per_item=2)
    assert (added, skipped) == (10, 0)
    with db.read() as c:
        per_labeler = [n for (n,) in c.execute("SELECT COUNT(*) FROM assignments GROUP BY labeler")]
        per_item = [n for (n,) in c.execute("SELECT COUNT(DISTINCT labeler) FROM assignments GROUP BY item")]
        pairs = {
            tuple(sorted(map(int, g.split(","))))
            for (g,) in c.execute("SELECT group_concat(labeler) FROM assignments GROUP BY item")
        }
    assert per_labeler == [5, 5, 5, 5]
    assert per_item == [2] * 10
    assert len(pairs) >= 4, "overlaps should vary so agreement covers many labeler pairs"
    # Loading the same file again adds nothing.
    assert db.load("rank", tmp_path / "s.jsonl", per_item=2) == (0, 10)
    assert count(db, "items") == 10


@pytest.mark.parametrize(
    "bad_row, field",
    [
        ({"prompt": "p", "responses": ["only one"]}, "responses"),
        ({"prompt": "p", "responses": "abc"}, "responses"),
        ({"prompt": "p", "responses": ["a", ""]}, "responses[1]"),
        ({"prompt": 3, "responses": ["a", "b"]}, "prompt"),
        ({"responses": ["a", "b"]}, "prompt"),
        ({"prompt": "p"}, "responses"),
    ],
)
def test_malformed_samples_are_refused_naming_line_and_field_and_nothing_is_inserted(db, tmp_path, bad_row, field):
    db.add_labeler("a")
    path = write_jsonl(tmp_path / "s.jsonl", samples(2) + [bad_row] + samples(1))
    with pytest.raises(InputError) as e:
        db.load("rank", path)
    assert f"s.jsonl:3: field '{field}'" in str(e.value)
    assert "\n" not in str(e.value)
    assert count(db, "items") == count(db, "assignments") == 0


def test_malformed_prompts_and_bad_json_are_refused(db, tmp_path):
    db.add_labeler("a")
    with pytest.raises(InputError, match=r"p.jsonl:2: field 'prompt': missing"):
        db.load("demo", write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"text": "x"}]))
    with pytest.raises(InputError, match=r"j.jsonl:2: not valid JSON"):
        db.load("demo", write_jsonl(tmp_path / "j.jsonl", [{"prompt": "ok"}, '{"prompt": ']))
    with pytest.raises(InputError, match="needs at least 3 labelers"):
        db.load("demo", write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "ok"}]), per_item=3)
    assert count(db, "items") == 0


def test_tokens_are_stored_only_as_hashes_and_reissue_revokes(db):
    token = db.add_labeler("ann")
    assert db.labeler_for_token(token)[1] == "ann"
    assert db.labeler_for_token(token + "x") is None
    raw = db.path.read_bytes() + db.path.with_name(db.path.name + "-wal").read_bytes()
    assert token.encode() not in raw
    with pytest.raises(InputError, match="already exists"):
        db.add_labeler("ann")
    new = db.add_labeler("ann", reissue=True)
    assert db.labeler_for_token(token) is None and db.labeler_for_token(new)[1] == "ann"
    with db.read() as c:
        assert c.execute("SELECT token_hash FROM labelers").fetchone()[0] == hash_token(new)
    with pytest.raises(InputError, match="labeler name"):
        db.add_labeler("bad name; drop table")


def rank_task(k=4):
    return {"kind": "rank", "prompt": "p", "responses": [f"r{j}" for j in range(k)]}


def test_validate_label_canonicalizes_and_names_the_bad_field():
    out = validate_label(
        rank_task(),
        {"ranking": [2, [3, 0], 1], "likert": 5, "flags": {"toxic": [1, 1], "hallucination": [3, 0]}},
    )
    assert out == {
        "ranking": [2, [0, 3], 1],
        "likert": 5,
        "flags": {"fails_instruction": [], "hallucination": [0, 3], "inappropriate": [], "toxic": [1]},
    }
    bad = [
        ({"ranking": [0, 1, 2], "likert": 3}, "ranking"),  # not a permutation
        ({"ranking": [0, 1, 2, 2], "likert": 3}, "ranking"),
        ({"ranking": [[0, 1, 2, 3]], "likert": 3}, "ranking"),  # all tied
        ({"ranking": [0, 1, 2, "3"], "likert": 3}, "ranking"),
        ({"ranking": [0, 1, 2, 3]}, "likert"),
        ({"ranking": [0, 1, 2, 3], "likert": 8}, "likert"),
        ({"ranking": [0, 1, 2, 3], "likert": True}, "likert"),
        ({"ranking": [0, 1, 2, 3], "likert": 3, "flags": {"toxic": [4]}}, "flags.toxic"),
        ({"ranking": [0, 1, 2, 3], "likert": 3, "flags": {"rude": [0]}}, "flags"),
        ({"ranking": [0, 1, 2, 3], "likert": 3, "labeler": "bob"}, "labeler"),
        ({"likert": 3}, "ranking"),
    ]
    for body, field in bad:
        with pytest.raises(InputError, match=f"field '{field}'"):
            validate_label(rank_task(), body)
    demo = {"kind": "demo", "prompt": "p"}
    assert validate_label(demo, {"completion": " keep  spacing\n"}) == {"completion": " keep  spacing\n"}
    for body in (
        {"completion": "  "},
        {"completion": 3},
        {},
        {"completion": "x" * 20_001},
        {"completion": "x", "ranking": [0, 1]},
    ):
        with pytest.raises(InputError):
            validate_label(demo, body)


def test_submit_is_once_per_labeler_and_task(db, tmp_path):
    ann, bob = db.add_labeler("ann"), db.add_labeler("bob")
    ann_id, bob_id = db.labeler_for_token(ann)[0], db.labeler_for_token(bob)[0]
    db.load("rank", write_jsonl(tmp_path / "s.jsonl", samples(1)), per_item=1)  # -> ann only
    body = {"ranking": [1, 0, 2, 3], "likert": 4}
    assert db.submit(ann_id, 1, body) == "stored"
    assert db.submit(ann_id, 1, {"ranking": [1, 0, 2, 3], "likert": 4, "flags": {}}) == "duplicate"
    with pytest.raises(LabelConflict):
        db.submit(ann_id, 1, {"ranking": [0, 1, 2, 3], "likert": 4})
    with pytest.raises(KeyError):
        db.submit(bob_id, 1, body)  # not bob's task
    with pytest.raises(KeyError):
        db.submit(ann_id, 99, body)
    assert db.task(bob_id, 1) is None
    assert db.task(ann_id, 1)["label"]["ranking"] == [1, 0, 2, 3]
    # The database itself refuses a second row for (labeler, item).
    with pytest.raises(sqlite3.IntegrityError):
        with db.write() as c:
            c.execute("INSERT INTO labels (item, labeler, payload, created) VALUES (1, ?, '{}', 0)", (ann_id,))
    assert count(db, "labels") == 1


def test_export_is_what_rm_and_sft_read(db, tmp_path):
    ann = db.labeler_for_token(db.add_labeler("ann"))[0]
    db.load("rank", write_jsonl(tmp_path / "s.jsonl", samples(2, k=3)))
    db.load("demo", write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Say hi"}, {"prompt": "unlabeled"}]))
    db.submit(ann, 1, {"ranking": [[2, 1], 0], "likert": 6, "flags": {"hallucination": [0]}})
    db.submit(ann, 3, {"completion": "Hi! 👋"})
    n_rank, n_demo = db.export(tmp_path / "out")
    assert (n_rank, n_demo) == (1, 1)
    (r,) = read_rankings(tmp_path / "out" / "rankings.jsonl")
    assert r.responses == ("r0.0", "r0.1", "r0.2") and r.groups == ((1, 2), (0,))
    (d,) = read_demos(tmp_path / "out" / "demonstrations.jsonl")
    assert (d.prompt, d.completion) == ("Say hi", "Hi! 👋")
    row = json.loads((tmp_path / "out" / "rankings.jsonl").read_text())
    assert row["labeler"] == "ann" and row["likert"] == 6 and row["flags"]["hallucination"] == [0]


def test_cli_round_trip_and_one_line_errors(tmp_path, capsys):
    dbp = str(tmp_path / "l.db")
    assert main(["label", "add-labeler", "--db", dbp, "ann"]) == 0
    token = capsys.readouterr().out.split()[3]
    assert len(token) >= 32
    path = write_jsonl(tmp_path / "s.jsonl", samples(3))
    assert main(["label", "load", "--db", dbp, "--samples", str(path)]) == 0
    assert "loaded 3 ranking items" in capsys.readouterr().out
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "responses": ["a"]}])
    assert main(["label", "load", "--db", dbp, "--samples", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.jsonl:1: field 'responses'" in err
    assert err.count("\n") == 1
    assert main(["label", "status", "--db", dbp]) == 0
    assert "ann" in capsys.readouterr().out
    assert main(["label", "export", "--db", dbp, "--out", str(tmp_path / "out")]) == 0
    assert "wrote 0 rankings" in capsys.readouterr().out
    assert main(["label", "export", "--db", str(tmp_path / "none.db"), "--out", "x"]) == 2
    assert "no labeling database" in capsys.readouterr().err


def test_refuses_a_foreign_sqlite_file(tmp_path):
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE t (x)")
    with pytest.raises(InputError, match="not an rlhflab labeling database"):
        LabelDB(other)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(InputError):
        LabelDB(junk)
