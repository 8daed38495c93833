"""`rlhflab sim`: serve the policy simulator page on this machine.

Standard library only. Each page load gets a session: a `core.Simulator` held here,
so the maths stays in Python and the page only draws what the API returns. Every
action (step, params, preset, nudge, reset) is a JSON POST that answers with the
state to draw.

Who may connect: by default only this machine (loopback clients using a loopback Host
name, which also stops DNS-rebinding pages). With `--token`, others may too if they
present it (header X-Rlhflab-Token, `?token=` once, then a cookie). A bad value gets
a 4xx with {"error": "..."}; a client never sees a traceback.
"""

from __future__ import annotations

import argparse
import hmac
import http.cookies
import json
import secrets
import socket
import sys
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from rlhflab.errors import InputError
from rlhflab.sim import core
from rlhflab.web import is_loopback

STATIC = Path(__file__).resolve().parent / "static"
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'"
)
MAX_BODY = 64 * 1024
MAX_SESSIONS = 64  # each holds at most core.MAX_STEPS readouts
TOKEN_HEADER = "X-Rlhflab-Token"
TOKEN_COOKIE = "rlhflab_token"


class ClientError(Exception):
    """A request the client got wrong: answered with `status` and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def allowed(client_ip: str, host_header: str, presented: str | None, token: str | None) -> bool:
    """The access rule: the right token from anywhere, else loopback clients only."""
    if token and presented and hmac.compare_digest(presented.encode(), token.encode()):
        return True
    hostname = urlsplit(f"//{host_header}").hostname or ""
    return is_loopback(client_ip) and is_loopback(hostname)


class Sessions:
    """Simulators by session id, the least recently used dropped past MAX_SESSIONS."""

    def __init__(self):
        self._sims: OrderedDict[str, core.Simulator] = OrderedDict()
        self.lock = threading.Lock()  # one lock: every action takes microseconds

    def new(self) -> tuple[str, core.Simulator]:
        sid, sim = secrets.token_urlsafe(12), core.Simulator()
        self._sims[sid] = sim
        while len(self._sims) > MAX_SESSIONS:
            self._sims.popitem(last=False)
        return sid, sim

    def get(self, sid) -> core.Simulator:
        if not isinstance(sid, str) or sid not in self._sims:
            raise ClientError(404, "unknown or expired session; reload the page")
        self._sims.move_to_end(sid)
        return self._sims[sid]


def config_payload() -> dict:
    return {
        "styles": list(core.STYLES),
        "presets": {name: {"title": title, "params": asdict(p)} for name, (title, p) in core.PRESETS.items()},
        "defaults": asdict(core.Params()),
        "limits": core.Params.LIMITS,
        "gap_alarm": core.GAP_ALARM,
        "max_steps": core.MAX_STEPS,
    }


def _action(sim: core.Simulator, action: str, body: dict) -> None:
    """Apply one POSTed action to a session's simulator."""
    if action == "step":
        sim.run(body.get("n", 1))
    elif action == "params":
        changes = body.get("params")
        if not isinstance(changes, dict) or not changes:
            raise InputError("must be a non-empty object of parameter values", field="params")
        sim.set_params(**changes)
    elif action == "preset":
        sim.apply_preset(body.get("name"))
    elif action == "nudge":
        sim.nudge(body.get("style"), body.get("delta"))
    elif action == "reset":
        sim.reset()
    elif action != "state":
        raise ClientError(404, f"no such action {action!r}")


class Handler(BaseHTTPRequestHandler):
    server_version = "rlhflab-sim"
    sys_version = ""
    sessions: Sessions
    token: str | None = None
    quiet = True

    # -- plumbing --
    def log_message(self, format, *args):
        if not self.quiet:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: dict, extra: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", extra)

    def _presented_token(self, query: dict) -> tuple[str | None, bool]:
        """The token the client sent, and whether it came in the URL."""
        if self.headers.get(TOKEN_HEADER):
            return self.headers[TOKEN_HEADER], False
        if query.get("token"):
            return query["token"][0], True
        cookie = http.cookies.SimpleCookie()
        try:
            cookie.load(self.headers.get("Cookie", ""))
        except http.cookies.CookieError:
            return None, False
        return (cookie[TOKEN_COOKIE].value if TOKEN_COOKIE in cookie else None), False

    def _handle(self, method: str) -> None:
        try:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            presented, in_url = self._presented_token(query)
            if not allowed(self.client_address[0], self.headers.get("Host", ""), presented, self.token):
                raise ClientError(
                    403,
                    "refused: this simulator serves only this machine (start it with --token to let others in)",
                )
            extra = {}
            if in_url and self.token and hmac.compare_digest(presented.encode(), self.token.encode()):
                # The page's own scripts and API calls then carry the token as a cookie.
                cookie = http.cookies.SimpleCookie({TOKEN_COOKIE: self.token})
                cookie[TOKEN_COOKIE].update({"path": "/", "httponly": True, "samesite": "Strict"})
                extra["Set-Cookie"] = cookie[TOKEN_COOKIE].OutputString()
            if method in ("GET", "HEAD"):
                self._get(url.path, extra)
            else:
                self._post(url.path)
        except ClientError as e:
            self._json(e.status, {"error": str(e)})
        except InputError as e:
            self._json(400, {"error": str(e)})
        except Exception:  # a bug: say so briefly, keep the traceback on the server
            traceback.print_exc(file=sys.stderr)
            self._json(500, {"error": "internal error (the server's log has the details)"})

    def _get(self, path: str, extra: dict) -> None:
        if path in FILES:
            name, ctype = FILES[path]
            self._send(200, (STATIC / name).read_bytes(), ctype, extra)
        elif path == "/api/config":
            self._json(200, config_payload(), extra)
        elif path.startswith("/api/"):
            raise ClientError(405, f"{path} takes POST with a JSON body")
        else:
            raise ClientError(404, f"no such page {path!r}")

    def _post(self, path: str) -> None:
        if not path.startswith("/api/"):
            raise ClientError(405, "only /api/... takes POST")
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            # Also keeps other web sites from posting here: JSON needs a CORS preflight.
            raise ClientError(415, "send the body as application/json")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise ClientError(400, "bad Content-Length") from None
        if length > MAX_BODY:
            raise ClientError(413, f"body over {MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ClientError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ClientError(400, "the body must be a JSON object")
        since = body.get("since", 0)
        if isinstance(since, bool) or not isinstance(since, int) or since < 0:
            raise InputError(f"must be a non-negative integer (got {since!r})", field="since")
        action = path.removeprefix("/api/")
        with self.sessions.lock:
            if action == "session":
                sid, sim = self.sessions.new()
            else:
                sid, sim = body.get("session"), self.sessions.get(body.get("session"))
                _action(sim, action, body)
            state = sim.to_dict(since)
        self._json(200, {"session": sid, **state})

    def do_GET(self):
        self._handle("GET")

    def do_HEAD(self):
        self._handle("HEAD")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._json(405, {"error": "method not allowed"})

    do_DELETE = do_PATCH = do_PUT


def make_server(
    host: str = "127.0.0.1", port: int = 8765, token: str | None = None, quiet: bool = True
) -> ThreadingHTTPServer:
    """Bind a server; refuse a non-loopback host without a token."""
    if not is_loopback(host) and not token:
        raise InputError(
            f"--host {host} lets other machines connect; pass --token SECRET "
            "as well (or keep the default --host 127.0.0.1)"
        )
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InputError(f"--port must be 0..65535 (got {port!r})")
    handler = type("SimHandler", (Handler,), {"sessions": Sessions(), "token": token or None, "quiet": quiet})
    cls = ThreadingHTTPServer
    if ":" in host.strip("[]"):
        cls = type("V6Server", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
    try:
        server = cls((host.strip("[]"), port), handler)
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    server.daemon_threads = True
    return server


def server_url(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/"


def start_in_thread(host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> tuple[str, Callable[[], None]]:
    """Serve in a daemon thread (for tests): returns (url, stop)."""
    server = make_server(host, port, token)
    thread = threading.Thread(target=server.serve_forever, name="rlhflab-sim", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return server_url(server), stop


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765; 0 picks a free one)")
    parser.add_argument(
        "--token",
        default=None,
        help="shared secret other machines must present; required when --host is not a loopback address",
    )
    parser.add_argument("--verbose", action="store_true", help="log every request")


def run_cli(args: argparse.Namespace) -> int:
    server = make_server(args.host, args.port, args.token, quiet=not args.verbose)
    url = server_url(server)
    print(
        f"rlhflab sim: serving on {url}" + (f"?token={args.token}" if args.token else "") + "  (Ctrl-C to stop)",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("rlhflab sim: stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0
