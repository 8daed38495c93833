"""The labeling server: bad input, isolation between labelers, load, and kill -9."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from rlhflab.errors import InputError
from rlhflab.label.db import LabelDB
from rlhflab.label.server import MAX_BODY, make_server

OWNER = "owner-token-for-tests-0123456789"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_db(tmp_path, labelers, n_rank, n_demo=0, per_item=1, k=4):
    """A database with named labelers and items; returns (db, {name: token})."""
    db = LabelDB(tmp_path / "labels.db")
    tokens = {name: db.add_labeler(name) for name in labelers}
    rank = [{"prompt": f"rank {i}", "responses": [f"answer {i}.{j}" for j in range(k)]} for i in range(n_rank)]
    db.load("rank", write_jsonl(tmp_path / "samples.jsonl", rank), per_item=per_item)
    if n_demo:
        demo = [{"prompt": f"write {i}"} for i in range(n_demo)]
        db.load("demo", write_jsonl(tmp_path / "prompts.jsonl", demo), per_item=per_item)
    return db, tokens


class Client:
    """One keep-alive connection, like one browser tab."""

    def __init__(self, port, token=None):
        self.port, self.token = port, token
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def request(self, method, path, body=None, *, raw=None, headers=None):
        h = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        h.update(headers or {})
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            h.setdefault("Content-Type", "application/json")
        try:
            self.conn.request(method, path, body=data, headers=h)
            res = self.conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionError):
            self.conn.close()  # the server closed a kept-alive connection: reconnect once
            self.conn.request(method, path, body=data, headers=h)
            res = self.conn.getresponse()
        payload = res.read()
        if res.getheader("Connection", "").lower() == "close":
            self.conn.close()
        return res.status, json.loads(payload) if payload else None

    def close(self):
        self.conn.close()


@pytest.fixture
def serve():
    """Start an in-process server on a free port; yields a function db -> port."""
    servers = []

    def start(db):
        server = make_server(db, "127.0.0.1", 0, OWNER)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def labels_snapshot(db):
    with db.read() as c:
        return c.execute("SELECT id, item, labeler, payload FROM labels ORDER BY id").fetchall()


def rank_body(k=4, shift=0):
    order = [(j + shift) % k for j in range(k)]
    return {"ranking": order, "likert": 1 + shift % 7, "flags": {"toxic": [order[-1]]}}


def test_bad_input_gets_a_clear_4xx_and_changes_nothing(tmp_path, serve):
    db, tok = make_db(tmp_path, ["ann", "bob"], n_rank=2, n_demo=2, per_item=1)
    port = serve(db)
    ann, bob = Client(port, tok["ann"]), Client(port, tok["bob"])
    ann_tasks = {t["id"]: t["kind"] for t in ann.request("GET", "/api/tasks")[1]["tasks"]}
    bob_tasks = {t["id"]: t["kind"] for t in bob.request("GET", "/api/tasks")[1]["tasks"]}
    rank_id = next(i for i, k in ann_tasks.items() if k == "rank")
    demo_id = next(i for i, k in ann_tasks.items() if k == "demo")
    bob_rank = next(i for i, k in bob_tasks.items() if k == "rank")
    # One good label first, so "changes nothing" also covers overwriting it.
    assert ann.request("POST", f"/api/tasks/{rank_id}/label", rank_body())[0] == 201
    before = labels_snapshot(db)

    cases = [  # (client, method, path, body or raw bytes, expected status, words in the message)
        (
            Client(port, "not-a-token"),
            "POST",
            f"/api/tasks/{rank_id}/label",
            rank_body(),
            401,
            "unknown token",
        ),
        (Client(port), "GET", "/api/tasks", None, 401, "missing token"),
        (Client(port, OWNER), "POST", f"/api/tasks/{rank_id}/label", rank_body(), 403, "owner token"),
        (bob, "POST", f"/api/tasks/{rank_id}/label", rank_body(), 404, "not assigned to you"),
        (bob, "GET", f"/api/tasks/{rank_id}", None, 404, "not assigned to you"),
        (ann, "POST", f"/api/tasks/{bob_rank}/label", rank_body(), 404, "not assigned to you"),
        (ann, "POST", "/api/tasks/999999/label", rank_body(), 404, "task 999999 does not exist"),
        (ann, "POST", "/api/tasks/abc/label", rank_body(), 404, "must be a number"),
        (ann, "POST", f"/api/tasks/{rank_id}/label", rank_body(shift=1), 409, "already labeled"),
        (
            bob,
            "POST",
            f"/api/tasks/{bob_rank}/label",
            {"ranking": [0, 1, 1, 2], "likert": 3},
            400,
            "permutation",
        ),
        (
            bob,
            "POST",
            f"/api/tasks/{bob_rank}/label",
            {"ranking": [0, 1, 2], "likert": 3},
            400,
            "permutation",
        ),
        (bob, "POST", f"/api/tasks/{bob_rank}/label", {"ranking": [0, 1, 2, 3], "likert": 9}, 400, "likert"),
        (
            bob,
            "POST",
            f"/api/tasks/{bob_rank}/label",
            {**rank_body(), "labeler": "ann"},
            400,
            "unknown field",
        ),
        (bob, "POST", f"/api/tasks/{bob_rank}/label", b'{"ranking": [0, 1', 400, "not valid JSON"),
        (bob, "POST", f"/api/tasks/{bob_rank}/label", b"[0, 1, 2, 3]", 400, "JSON object"),
        (bob, "POST", f"/api/tasks/{bob_rank}/label", b"\xff\xfe", 400, "UTF-8"),
        (ann, "POST", f"/api/tasks/{demo_id}/label", {"completion": "x" * 20_001}, 400, "too long"),
        (ann, "POST", f"/api/tasks/{demo_id}/label", b"x" * (MAX_BODY + 1), 413, "too large"),
        (ann, "POST", f"/api/tasks/{demo_id}/label", {"completion": "  "}, 400, "non-empty"),
        (ann, "GET", f"/api/tasks/{demo_id}/label", None, 405, "use POST"),
        (ann, "DELETE", f"/api/tasks/{rank_id}", None, 405, "not allowed"),
        (ann, "GET", "/api/owner/status", None, 403, "owner token"),
        (ann, "GET", "/api/labels", None, 404, "no such"),
        (ann, "GET", "/static/../db.py", None, 404, "no such"),
    ]
    for client, method, path, body, status, words in cases:
        raw = body if isinstance(body, bytes) else None
        got, payload = client.request(method, path, None if raw is not None else body, raw=raw)
        assert (got, words) == (status, words) and words in payload["error"], (method, path, payload)
        assert "Traceback" not in payload["error"]
    # Raw bytes http.client would refuse to send: a non-ASCII digit, a broken request line.
    for raw in (
        b"GET /api/tasks/\xb2 HTTP/1.1\r\nAuthorization: Bearer "
        + tok["ann"].encode()
        + b"\r\nConnection: close\r\n\r\n",
        b"GET /a b HTTP/1.1\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(raw)
            reply = b"".join(iter(lambda: sock.recv(65536), b""))
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.split()[1] in (b"400", b"404") and "error" in json.loads(body), reply
    assert labels_snapshot(db) == before


def test_no_request_reads_or_changes_another_labelers_labels(tmp_path, serve):
    db, tok = make_db(tmp_path, ["ann", "bob"], n_rank=3, per_item=2)  # both get every item
    port = serve(db)
    ann, bob = Client(port, tok["ann"]), Client(port, tok["bob"])
    assert ann.request("POST", "/api/tasks/1/label", rank_body(shift=0))[0] == 201
    # Bob sees the shared task, but not Ann's label, and his own label is independent.
    status, task = bob.request("GET", "/api/tasks/1")
    assert status == 200 and task["label"] is None
    assert [t["done"] for t in bob.request("GET", "/api/tasks")[1]["tasks"]] == [False] * 3
    assert bob.request("POST", "/api/tasks/1/label", rank_body(shift=1))[0] == 201
    assert ann.request("GET", "/api/tasks/1")[1]["label"]["ranking"] == [0, 1, 2, 3]
    assert bob.request("GET", "/api/tasks/1")[1]["label"]["ranking"] == [1, 2, 3, 0]
    # The owner sees progress and agreement, and nothing else needs or accepts a labeler name.
    status, s = Client(port, OWNER).request("GET", "/api/owner/status")
    assert status == 200 and {p["name"]: p["done"] for p in s["labelers"]} == {"ann": 1, "bob": 1}
    assert s["agreement"]["pairs"] == [{"a": "ann", "b": "bob", "items": 1, "agreement": 0.5}]


def test_pages_are_served_with_a_strict_policy_and_non_loopback_needs_an_owner_token(tmp_path, serve):
    db, _ = make_db(tmp_path, ["ann"], n_rank=1)
    port = serve(db)
    for path, kind in [("/", "text/html"), ("/owner", "text/html"), ("/static/app.js", "javascript")]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", path)
        res = conn.getresponse()
        assert res.status == 200 and kind in res.getheader("Content-Type")
        assert "default-src 'self'" in res.getheader("Content-Security-Policy")
        assert not re.search(rb"""(?:src|href)=["']?(?:https?:)?//|url\((?:https?:)?//|@import""", res.read()), (
            "no external assets"
        )
        conn.close()
    with pytest.raises(InputError, match="non-loopback"):
        make_server(db, "0.0.0.0", 0, None)
    with pytest.raises(InputError, match="at least 16"):
        make_server(db, "0.0.0.0", 0, "short")


def test_20_concurrent_labelers_1000_submissions_lose_nothing(tmp_path, serve, artifacts_dir):
    """20 labelers, each in two tabs; the tabs race on 5 shared tasks (1,000 requests)."""
    names = [f"lab{i:02d}" for i in range(20)]
    db, tok = make_db(tmp_path, names, n_rank=450, per_item=2)  # 45 tasks per labeler
    port = serve(db)
    plans, results = {}, []
    for name in names:
        ids = [t["id"] for t in Client(port, tok[name]).request("GET", "/api/tasks")[1]["tasks"]]
        assert len(ids) == 45
        # Tab A sends tasks 20-24 then 0-19; tab B sends 20-24 then 25-44. On the shared
        # five, B repeats A's label exactly for even tasks and differs for odd ones.
        tab_a = [(i, rank_body(shift=0)) for i in ids[20:25] + ids[:20]]
        tab_b = [(i, rank_body(shift=0 if n % 2 == 0 else 1)) for n, i in enumerate(ids[20:25])]
        tab_b += [(i, rank_body(shift=0)) for i in ids[25:]]
        plans[name] = (tab_a, tab_b)
    barrier = threading.Barrier(40)
    lock = threading.Lock()

    def tab(name, plan):
        client = Client(port, tok[name])
        barrier.wait()
        out = [(name, i, body, *client.request("POST", f"/api/tasks/{i}/label", body)) for i, body in plan]
        client.close()
        with lock:
            results.extend(out)

    threads = [threading.Thread(target=tab, args=(n, p)) for n in names for p in plans[n]]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    elapsed = time.perf_counter() - t0
    assert len(results) == 1000 and elapsed < 20

    statuses = [r[3] for r in results]
    assert set(statuses) <= {200, 201, 409}, sorted(set(statuses))
    # Each labeler's 5 raced tasks: 3 identical repeats (one 201 + one 200 duplicate) and
    # 2 different ones (one 201 + one 409), whichever tab wins the race.
    assert (statuses.count(201), statuses.count(200), statuses.count(409)) == (900, 60, 40)
    name_of = {db.labeler_for_token(tok[n])[0]: n for n in names}
    with db.read() as c:
        stored = {
            (name_of[lab], item): json.loads(p)
            for lab, item, p in c.execute("SELECT labeler, item, payload FROM labels")
        }
        assert c.execute("SELECT COUNT(*) FROM labels").fetchone()[0] == 900
    assert len(stored) == 900  # exactly one label per (labeler, task)
    for name, item, body, status, _ in results:
        if status in (200, 201):  # every acknowledged submission is the stored one
            assert stored[(name, item)]["ranking"] == body["ranking"]
            assert stored[(name, item)]["likert"] == body["likert"]
    rate = len(results) / elapsed
    (artifacts_dir / "label_load.json").write_text(
        json.dumps(
            {
                "labelers": 20,
                "connections": 40,
                "submissions": 1000,
                "stored": 900,
                "seconds": round(elapsed, 3),
                "submissions_per_s": round(rate, 1),
            }
        )
        + "\n"
    )
    print(f"\nlabel load test: 1000 submissions in {elapsed:.2f}s = {rate:.0f}/s")


def start_subprocess_server(db_path, log_path):
    """`rlhflab label serve` as its own process, output to a file; returns (process, port)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rlhflab.cli",
                "label",
                "serve",
                "--db",
                str(db_path),
                "--port",
                "0",
                "--owner-token",
                OWNER,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"labeling app: http://127\.0\.0\.1:(\d+)/", log_path.read_text())
        if found:
            return proc, int(found.group(1))
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("server did not start: " + log_path.read_text())


def test_kill_9_mid_submission_keeps_every_acknowledged_label(tmp_path):
    names = [f"k{i}" for i in range(8)]
    db, tok = make_db(tmp_path, names, n_rank=800, n_demo=400)  # 150 tasks each
    db.close()
    proc, port = start_subprocess_server(tmp_path / "labels.db", tmp_path / "server1.log")
    acked, failures, refused, stop = [], [], [], threading.Event()
    lock = threading.Lock()

    def labeler(name):
        client = Client(port, tok[name])
        for t in client.request("GET", "/api/tasks")[1]["tasks"]:
            if stop.is_set():
                return
            body = rank_body(shift=t["id"]) if t["kind"] == "rank" else {"completion": f"answer {t['id']} " * 50}
            try:
                status, _ = client.request("POST", f"/api/tasks/{t['id']}/label", body)
            except (OSError, http.client.HTTPException) as e:  # killed mid-request: no ack
                with lock:
                    failures.append(repr(e))
                return
            with lock:
                if status == 201:
                    acked.append((name, t["id"], body))
                else:
                    refused.append((name, t["id"], status))

    threads = [threading.Thread(target=labeler, args=(n,)) for n in names]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 15
    while len(acked) < 200 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    for t in threads:  # each labeler's request in flight, or its next one, fails: no ack
        t.join(timeout=10)
    stop.set()
    assert not refused, refused[:5]
    assert len(acked) >= 200 and len(failures) == len(names), "the kill should land before the labelers finish"

    conn = sqlite3.connect(tmp_path / "labels.db")  # recovers from the WAL
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT COUNT(*) FROM labels").fetchone()[0] >= len(acked)
    conn.close()
    proc, port = start_subprocess_server(tmp_path / "labels.db", tmp_path / "server2.log")
    try:
        clients = {n: Client(port, tok[n]) for n in names}
        for name, item, body in acked:
            status, task = clients[name].request("GET", f"/api/tasks/{item}")
            label = task["label"]
            assert status == 200 and label is not None, (name, item)
            if "completion" in body:
                assert label == body
            else:
                assert (label["ranking"], label["likert"]) == (body["ranking"], body["likert"])
        # And it keeps working: the next task of the first labeler still takes a label.
        todo = next(t for t in clients["k0"].request("GET", "/api/tasks")[1]["tasks"] if not t["done"])
        body = rank_body() if todo["kind"] == "rank" else {"completion": "after restart"}
        assert clients["k0"].request("POST", f"/api/tasks/{todo['id']}/label", body)[0] == 201
    finally:
        proc.terminate()
        proc.wait(timeout=10)
