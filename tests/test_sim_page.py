"""The simulator page in headless Chromium, checked against rlhflab.sim.core; the server's
access rule and its answers to bad requests."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request

import pytest

from rlhflab.cli import main as cli_main
from rlhflab.errors import InputError
from rlhflab.sim import core
from rlhflab.sim.server import STATIC, allowed, make_server, start_in_thread

READOUTS = ("proxy", "true", "gap", "kl", "capability")


@pytest.fixture(scope="module")
def server():
    url, stop = start_in_thread()
    yield url
    stop()


# ---- the page ----


def wait_until(page, predicate, timeout=15.0):
    """Poll from Python: the page's CSP forbids the eval that wait_for_function needs."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("the page did not get there in time")
        page.wait_for_timeout(30)


def settle(page):
    """Wait until no request is in flight and the page is not playing."""
    wait_until(
        page,
        lambda: page.get_attribute("body", "data-pending") == "0" and page.get_attribute("body", "data-playing") == "0",
    )


def assert_page_shows(page, sim: core.Simulator):
    assert int(page.text_content("#step")) == sim.step
    r = sim.current
    for key in READOUTS:
        assert float(page.text_content(f"#{key}")) == pytest.approx(getattr(r, key), abs=6e-4), key
    assert page.text_content("#verdict") == r.verdict
    shares = [float(page.text_content(f"#style-table tr[data-style={s}] td:nth-child(2)")[:-1]) for s in core.STYLES]
    assert shares == pytest.approx(100 * sim.policy, abs=0.06)
    log = [
        (
            int(li.query_selector(".where").text_content().split()[-1]),
            li.query_selector(".text").text_content(),
        )
        for li in page.query_selector_all("#log li")
    ]
    assert log == [(e.step, e.text) for e in reversed(sim.events)]
    followed = page.query_selector_all("#log li .followed")
    assert [f.text_content() for f in followed] == [e.followed for e in reversed(sim.events) if e.followed]


def drag_slider(page, selector: str, fraction: float) -> float:
    """Drag a range input's thumb with the mouse from its current place to `fraction`."""
    box = page.locator(selector).bounding_box()
    lo, hi = (float(page.get_attribute(selector, k)) for k in ("min", "max"))
    value = float(page.input_value(selector))
    thumb = 8  # half the thumb: where Chromium's track effectively starts and ends
    x_of = lambda f: box["x"] + thumb + f * (box["width"] - 2 * thumb)
    y = box["y"] + box["height"] / 2
    page.mouse.move(x_of((value - lo) / (hi - lo)), y)
    page.mouse.down()
    page.mouse.move(x_of(fraction), y, steps=8)
    page.mouse.up()
    return float(page.input_value(selector))


def test_page_follows_the_core(browser, artifacts_dir, server):
    page = browser.new_page(viewport={"width": 1360, "height": 960})
    problems = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.goto(server)
    wait_until(page, lambda: page.get_attribute("body", "data-ready") == "1")
    sim = core.Simulator()  # the core, fed the same actions as the page
    assert_page_shows(page, sim)
    assert page.text_content("#proxy") == "0.677" and page.text_content("#kl") == "0.000"

    # A preset, then play for a while: the trajectory is the core's, whatever the timing.
    page.click("button[data-preset=reward_hacking]")
    page.click("#play")
    wait_until(page, lambda: int(page.text_content("#step")) >= 60)
    page.click("#pause")
    settle(page)
    sim.apply_preset("reward_hacking")
    sim.run(int(page.text_content("#step")))
    assert_page_shows(page, sim)
    assert page.text_content("#verdict") == "hacking"
    assert page.get_attribute("button[data-preset=reward_hacking]", "class") == "active"

    # Drag β up (the KL leash) and take a few steps: the policy is pulled back.
    before = float(page.text_content("#kl"))
    beta = drag_slider(page, "#beta", 0.3)
    assert 0.2 <= beta <= 0.4
    settle(page)
    assert page.text_content("#beta-val") == f"{beta:.2f}"
    sim.set_params(beta=beta)
    assert_page_shows(page, sim)
    newest = [t.text_content() for t in page.query_selector_all("#log li .text")][:2]
    assert f"β 0.00 → {beta:.2f}" in newest  # and, at once, a verdict flip: see the core
    for _ in range(5):
        page.click("#step-btn")
    settle(page)
    sim.run(5)  # five clicks, five single updates
    assert_page_shows(page, sim)
    assert float(page.text_content("#kl")) < before
    assert page.text_content(f"#log li:has-text('β 0.00 → {beta:.2f}') .followed").startswith("then 5 updates")

    # Click a bar, inspect it, nudge it.
    page.click("g.bar[data-style=Hedging] .bar-hit")
    assert page.text_content("#inspect-name") == "Hedging"
    assert "true 0.50" in page.text_content("#inspect-facts")
    page.click("#nudge-up")
    settle(page)
    sim.nudge("Hedging", 0.05)
    assert_page_shows(page, sim)
    assert page.text_content("#log li .text").startswith("nudged Hedging share ")
    page.click("#step-btn")
    settle(page)
    sim.run(1)
    assert_page_shows(page, sim)

    # Play on under the leash: the same numbers again, wherever the pause lands.
    start = sim.step
    page.click("#play")
    wait_until(page, lambda: int(page.text_content("#step")) >= start + 40)
    page.click("#pause")
    settle(page)
    sim.run(int(page.text_content("#step")) - start)
    assert_page_shows(page, sim)

    assert not problems, problems
    page.screenshot(path=str(artifacts_dir / "simulator.png"), full_page=True)
    assert (artifacts_dir / "simulator.png").stat().st_size > 10_000
    page.close()


def test_page_needs_nothing_from_outside():
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC / name).read_text()
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+", text)) - {"http://www.w3.org"}
        assert not urls, (name, urls)


# ---- the server: bad requests, and who may connect ----


def request(url, body=None, *, method=None, ctype="application/json", headers=None):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url,
        data=data,
        method=method or ("POST" if data else "GET"),
        headers={"Content-Type": ctype, **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as res:
            is_json = "json" in res.headers["Content-Type"]
            return res.status, json.loads(res.read()) if is_json else None
    except urllib.error.HTTPError as e:
        raw = e.read().decode()
        assert "Traceback" not in raw
        return e.code, json.loads(raw)


def test_bad_values_get_a_4xx_and_a_message(server):
    status, state = request(server + "api/session", {})
    assert status == 200 and state["readout"]["proxy"] == pytest.approx(0.6771, abs=1e-4)
    sid = state["session"]
    cases = [
        ("api/step", {"session": sid, "n": -1}, 400, "'n'"),
        ("api/step", {"session": sid, "n": "ten"}, 400, "'n'"),
        ("api/params", {"session": sid, "params": {"beta": "abc"}}, 400, "'beta'"),
        ("api/params", {"session": sid, "params": {"beta": 1e9}}, 400, "between"),
        ("api/params", {"session": sid, "params": {"corrupt_style": "Rude"}}, 400, "one of"),
        ("api/params", {"session": sid, "params": []}, 400, "'params'"),
        ("api/preset", {"session": sid, "name": "chaos"}, 400, "'preset'"),
        ("api/nudge", {"session": sid, "style": "Toxic", "delta": "lots"}, 400, "'delta'"),
        ("api/step", {"session": sid, "since": -3}, 400, "'since'"),
        ("api/step", {"session": "nope"}, 404, "session"),
        ("api/explode", {"session": sid}, 404, "no such action"),
        ("api/step", b"{not json", 400, "not valid JSON"),
        ("api/step", b"[1, 2]", 400, "JSON object"),
        ("api/step", b"x" * 70_000, 413, "body over"),
        ("nowhere", None, 404, "no such page"),
    ]
    for path, body, code, words in cases:
        status, answer = request(server + path, body)
        assert status == code and words in answer["error"], (path, body, status, answer)
    status, answer = request(server + "api/step", b'{"session": "x"}', ctype="text/plain")
    assert status == 415
    status, answer = request(server + "api/step", None, method="GET")
    assert status == 405
    status, state = request(server + "api/step", {"session": sid, "n": 3})
    assert status == 200 and state["step"] == 3  # the session survived all of that


def test_access_rule():
    assert allowed("127.0.0.1", "127.0.0.1:8765", None, None)
    assert allowed("::1", "localhost:8765", None, None)
    assert allowed("::ffff:127.0.0.1", "[::1]:8765", None, None)
    assert not allowed("192.168.1.20", "192.168.1.5:8765", None, None)
    assert not allowed("192.168.1.20", "192.168.1.5:8765", "guess", "s3cret")
    assert allowed("192.168.1.20", "192.168.1.5:8765", "s3cret", "s3cret")
    # A web page that rebinds its own name to 127.0.0.1 still sends its own Host.
    assert not allowed("127.0.0.1", "evil.example:8765", None, None)


def test_dns_rebinding_host_is_refused(server):
    status, answer = request(server + "api/config", headers={"Host": "evil.example"})
    assert status == 403 and "refused" in answer["error"]


def _non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent; this only picks a route
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def test_other_hosts_are_refused_without_the_token():
    with pytest.raises(InputError, match="--token"):
        make_server("0.0.0.0", 0, token=None)
    ip = _non_loopback_address()
    if ip is None:
        pytest.skip("no non-loopback interface to connect from")
    url, stop = start_in_thread("0.0.0.0", 0, token="s3cret")
    try:
        port = url.rsplit(":", 1)[1].strip("/")
        status, answer = request(f"http://{ip}:{port}/api/config")
        assert status == 403 and "--token" in answer["error"]
        status, config = request(f"http://{ip}:{port}/api/config", headers={"X-Rlhflab-Token": "s3cret"})
        assert status == 200 and config["styles"] == list(core.STYLES)
    finally:
        stop()


def test_cli_refuses_an_open_host_without_a_token(capsys):
    assert cli_main(["sim", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --host 0.0.0.0 lets other machines connect") and "\n" not in err
