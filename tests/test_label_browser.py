"""Headless Chromium: sign in, rank through the UI (clicks, drag, tie), write a
demonstration; the export holds exactly those labels. Also the owner's status page."""

from __future__ import annotations

import json
import threading

import pytest

from rlhflab.data import read_demos, read_rankings
from rlhflab.label.db import LabelDB
from rlhflab.label.server import make_server

OWNER = "owner-token-for-browser-test"
PROMPT = "Explain why the sky is blue to a six-year-old, in two sentences."
RESPONSES = [
    "Sunlight is made of many colours. The air bounces the blue part around the most, "
    "so blue light comes at your eyes from every part of the sky!",
    "The sky is blue because it reflects the ocean, which is blue.",
    "Great question!! You are so smart for asking. The sky is blue because of Rayleigh "
    "scattering: shorter wavelengths scatter more strongly off air molecules.",
    "Light from the sun hits tiny bits of air. Blue light bumps into them and spreads out "
    "the most, so when you look up, you see blue everywhere.",
]
ANSWER = "To sort a list in Python, call sorted(xs).\n\nIt returns a new list — the original stays as it was ✓"


@pytest.fixture
def app(tmp_path):
    db = LabelDB(tmp_path / "labels.db")
    token = db.add_labeler("ana")
    (tmp_path / "s.jsonl").write_text(json.dumps({"prompt": PROMPT, "responses": RESPONSES}) + "\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "How do I sort a list in Python?"}) + "\n")
    db.load("rank", tmp_path / "s.jsonl")
    db.load("demo", tmp_path / "p.jsonl")
    server = make_server(db, "127.0.0.1", 0, OWNER)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield db, token, server.url
    server.shutdown()
    server.server_close()
    db.close()


def test_labeler_ranks_and_writes_a_demo_and_the_export_has_exactly_those(app, browser, artifacts_dir, tmp_path):
    db, token, url = app
    page = browser.new_page(viewport={"width": 1360, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)

    # A wrong token is refused with a message; the right one signs in.
    page.fill("#token", "wrong-token")
    page.click("#signin-form button")
    page.wait_for_selector("#signin-msg:has-text('unknown token')")
    page.fill("#token", token)
    page.click("#signin-form button")
    page.wait_for_selector("h1:has-text('Task #1')")
    assert page.is_disabled("#submit")

    # Click in order C, D, A, B; then drag A above D; then tie D with A: [2, [0, 3], 1].
    for idx in (2, 3, 0, 1):
        page.click(f"[data-rank-btn='{idx}']")
    assert page.locator("#ranking li").evaluate_all("rs => rs.map(r => r.dataset.idx)") == [
        "2",
        "3",
        "0",
        "1",
    ]
    page.drag_and_drop("#ranking li[data-idx='0']", "#ranking li[data-idx='3']")
    assert page.locator("#ranking li").evaluate_all("rs => rs.map(r => r.dataset.idx)") == [
        "2",
        "0",
        "3",
        "1",
    ]
    page.check("[data-tie='3']")
    page.click("[data-flag='fails_instruction'][data-idx='1']")
    page.click("[data-flag='hallucination'][data-idx='1']")
    page.click("[data-flag='inappropriate'][data-idx='2']")
    assert page.inner_text("#rank-msg") == "Choose an overall quality from 1 to 7."
    page.click("[data-likert='6']")
    assert page.inner_text(".card[data-idx='3'] .rank-badge") == "#2"  # tied with A
    page.screenshot(path=str(artifacts_dir / "labeling.png"), full_page=True)
    page.click("#submit")

    # The app moves on to the demonstration task.
    page.wait_for_selector("#completion")
    page.fill("#completion", ANSWER)
    page.click("#submit")
    page.wait_for_selector("text=All done")
    assert page.inner_text("#progress span") == "2 of 2 done"

    # Going back to the ranking shows it submitted and locked.
    page.click(".task-link[data-task='1']")
    page.wait_for_selector(".final")
    assert page.locator("#submit").count() == 0
    assert not errors, errors

    db.export(tmp_path / "out")
    (ranking,) = read_rankings(tmp_path / "out" / "rankings.jsonl")
    assert ranking.prompt == PROMPT and list(ranking.responses) == RESPONSES
    assert ranking.groups == ((2,), (0, 3), (1,))
    row = json.loads((tmp_path / "out" / "rankings.jsonl").read_text())
    assert row["ranking"] == [2, [0, 3], 1] and row["likert"] == 6 and row["labeler"] == "ana"
    assert row["flags"] == {"fails_instruction": [1], "hallucination": [1], "inappropriate": [2], "toxic": []}
    (demo,) = read_demos(tmp_path / "out" / "demonstrations.jsonl")
    assert (demo.prompt, demo.completion) == ("How do I sort a list in Python?", ANSWER)
    page.close()


def test_owner_page_shows_progress_and_needs_the_owner_token(app, browser, artifacts_dir):
    db, token, url = app
    ana = db.labeler_for_token(token)[0]
    db.submit(ana, 1, {"ranking": [0, 3, 2, 1], "likert": 5})
    page = browser.new_page(viewport={"width": 1360, "height": 700})
    page.goto(url + "owner")
    page.fill("#token", token)  # a labeler token is not enough
    page.click("#signin-form button")
    page.wait_for_selector("#signin-msg:has-text('needs the owner token')")
    page.fill("#token", OWNER)
    page.click("#signin-form button")
    page.wait_for_selector("#progress-table tbody tr")
    cells = page.locator("#progress-table tbody tr").first.locator("td").all_inner_texts()
    assert cells[:3] == ["ana", "1", "2"]
    page.screenshot(path=str(artifacts_dir / "labeling-owner.png"), full_page=True)
    page.close()
