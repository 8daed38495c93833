"""The labeling web app: a standard-library HTTP server over `LabelDB`.

Pages
  GET  /                          the labeler app (sign in with a token, then label)
  GET  /owner                     the owner's status page (needs the owner token)
API (JSON; `Authorization: Bearer <token>` on every call)
  GET  /api/me                    who the token belongs to, and progress
  GET  /api/tasks                 this labeler's tasks
  GET  /api/tasks/<id>            one task, with this labeler's own label if any
  POST /api/tasks/<id>/label      {"ranking", "likert", "flags"} or {"completion"}
  GET  /api/owner/status          progress per labeler and inter-labeler agreement

A labeler is known only by the token; no request names a labeler, so no path reaches
another labeler's labels. Every error is JSON `{"error": "..."}` with a 4xx/5xx code.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import sys
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from rlhflab.errors import InputError
from rlhflab.label.db import FLAGS, MAX_COMPLETION, LabelConflict, LabelDB
from rlhflab.web import is_loopback

MAX_BODY = 256 * 1024  # bytes; a 20,000-character answer fits even fully \u-escaped
STATIC = Path(__file__).parent / "static"
PAGES = {  # URL path -> (file, content type); nothing else is served from disk
    "/": ("index.html", "text/html; charset=utf-8"),
    "/owner": ("owner.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/owner.js": ("owner.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
TASK_PATH = re.compile(r"/api/tasks/([^/]+)(/label)?")


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class LabelServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # 20+ labelers may connect at once

    def __init__(self, address, db: LabelDB, owner_token: str, *, log: bool = False):
        self.db, self.owner_token, self.log = db, owner_token, log
        self.pages = {p: ((STATIC / f).read_bytes(), ctype) for p, (f, ctype) in PAGES.items()}
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class Handler(BaseHTTPRequestHandler):
    server: LabelServer
    server_version = "rlhflab-label"
    protocol_version = "HTTP/1.1"  # keep-alive: a labeler's browser reuses one connection
    timeout = 60  # a stalled client frees its thread

    # -- plumbing ------------------------------------------------------------------

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_HEAD(self):
        self.send_error(405, f"{self.command} is not allowed; this app uses GET and POST")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        try:
            self._body = self._read_body(method)
            if path in self.server.pages:
                self._need(method, "GET")
                self._send(200, *self.server.pages[path])
                return
            status, body = self._route(method, path)
            self._send_json(status, body)
        except HTTPError as e:
            self._send_json(e.status, {"error": e.message})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left; nothing to answer
        except Exception:  # never a traceback to the client; the server log gets it
            traceback.print_exc(file=sys.stderr)
            self._send_json(500, {"error": "internal server error (details in the server log)"})

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, unknown method) as JSON too."""
        self.close_connection = True
        try:
            default = HTTPStatus(code).phrase.lower()
        except ValueError:
            default = "error"
        self._send_json(code, {"error": message or default})

    def _send_json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _send(self, status: int, data: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in SECURITY_HEADERS.items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        if self.server.log:
            super().log_message(fmt, *args)

    # -- routes --------------------------------------------------------------------

    def _route(self, method: str, path: str) -> tuple[int, object]:
        if path == "/api/me":
            self._need(method, "GET")
            labeler_id, name = self._labeler()
            tasks = self.server.db.tasks(labeler_id)
            return 200, {
                "labeler": name,
                "assigned": len(tasks),
                "done": sum(t["done"] for t in tasks),
                "flags": FLAGS,
                "max_completion": MAX_COMPLETION,
            }
        if path == "/api/tasks":
            self._need(method, "GET")
            return 200, {"tasks": self.server.db.tasks(self._labeler()[0])}
        if path == "/api/owner/status":
            self._need(method, "GET")
            self._owner()
            return 200, self.server.db.status()
        m = TASK_PATH.fullmatch(path)
        if m:
            return self._task(method, m.group(1), bool(m.group(2)))
        raise HTTPError(404, f"no such page or endpoint: {path}")

    def _task(self, method: str, raw_id: str, is_label: bool) -> tuple[int, object]:
        self._need(method, "POST" if is_label else "GET")
        labeler_id, _ = self._labeler()
        if not re.fullmatch(r"[0-9]{1,18}", raw_id):
            raise HTTPError(404, f"task id must be a number, got {raw_id[:40]!r}")
        item = int(raw_id)
        missing = HTTPError(404, f"task {item} does not exist or is not assigned to you")
        if not is_label:
            task = self.server.db.task(labeler_id, item)
            if task is None:
                raise missing
            return 200, task
        body = self._json_body()
        try:
            result = self.server.db.submit(labeler_id, item, body)
        except KeyError:
            raise missing from None
        except InputError as e:
            raise HTTPError(400, f"invalid label: {e}") from None
        except LabelConflict as e:
            raise HTTPError(409, str(e)) from None
        if result == "stored":
            return 201, {"stored": True, "task": item}
        return 200, {
            "stored": False,
            "duplicate": True,
            "task": item,
            "message": "already stored (identical resubmission)",
        }

    # -- request checks --------------------------------------------------------------

    def _need(self, method: str, allowed: str) -> None:
        if method != allowed:
            raise HTTPError(405, f"{method} not allowed here; use {allowed}")

    def _token(self) -> str:
        auth = self.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPError(401, "missing token: send 'Authorization: Bearer <token>'")
        return token.strip()

    def _labeler(self) -> tuple[int, str]:
        token = self._token()
        found = self.server.db.labeler_for_token(token)
        if found is None:
            if hmac.compare_digest(token.encode(), self.server.owner_token.encode()):
                raise HTTPError(403, "this is the owner token; sign in with a labeler token")
            raise HTTPError(401, "unknown token: sign in with the token your project owner issued")
        return found

    def _owner(self) -> None:
        token = self._token()
        if hmac.compare_digest(token.encode(), self.server.owner_token.encode()):
            return
        if self.server.db.labeler_for_token(token) is not None:
            raise HTTPError(403, "this page needs the owner token, not a labeler token")
        raise HTTPError(401, "unknown owner token")

    def _read_body(self, method: str) -> bytes:
        """Read the whole body first, so an early error never leaves it in the stream
        where a kept-alive connection would parse it as the next request."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise HTTPError(411, "send the body with a Content-Length, not chunked")
        length = self.headers.get("Content-Length")
        if length is None and method != "POST":
            return b""
        if length is None or not length.strip().isdigit():
            self.close_connection = True
            raise HTTPError(411, "a JSON body with a valid Content-Length is required")
        n = int(length)
        if n > MAX_BODY:
            self.close_connection = True  # the unread body must not be parsed as a request
            raise HTTPError(413, f"request body too large: {n} bytes, the limit is {MAX_BODY}")
        raw = self.rfile.read(n)
        if len(raw) < n:
            self.close_connection = True
            raise HTTPError(400, "request body shorter than its Content-Length")
        return raw

    def _json_body(self) -> dict:
        try:
            body = json.loads(self._body.decode("utf-8"))
        except UnicodeDecodeError:
            raise HTTPError(400, "body is not valid UTF-8") from None
        except json.JSONDecodeError as e:
            raise HTTPError(400, f"body is not valid JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "body must be a JSON object")
        return body


def make_server(
    db: LabelDB,
    host: str = "127.0.0.1",
    port: int = 8770,
    owner_token: str | None = None,
    *,
    log: bool = False,
) -> LabelServer:
    """Bind (port 0 picks a free one) without serving; call serve_forever() to run."""
    if not is_loopback(host) and not owner_token:
        raise InputError(
            f"refusing to serve on non-loopback host {host!r} without "
            "--owner-token (labels would be reachable from the network)"
        )
    if owner_token is not None and len(owner_token) < 16:
        raise InputError("--owner-token must be at least 16 characters")
    if owner_token is None:
        owner_token = secrets.token_urlsafe(24)
    try:
        return LabelServer((host, port), db, owner_token, log=log)
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror}") from None
