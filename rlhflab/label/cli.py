"""`rlhflab label ACTION`: serve the labeling app, add labelers, load items, export labels.

rlhflab label add-labeler --db labels.db alice          prints alice's token once
rlhflab label load --db labels.db --samples samples.jsonl --per-item 2
rlhflab label load --db labels.db --prompts prompts.jsonl
rlhflab label serve --db labels.db                       http://127.0.0.1:8770/
rlhflab label status --db labels.db                      progress and agreement
rlhflab label export --db labels.db --out labels/        rankings.jsonl, demonstrations.jsonl
"""

from __future__ import annotations

import argparse
import json
import os

from rlhflab.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = sub.add_parser("serve", help="serve the labeling app (127.0.0.1 by default)")
    p.add_argument("--db", required=True, help="SQLite database file (created if missing)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; a non-loopback one needs --owner-token")
    p.add_argument("--port", type=int, default=8770, help="port (0 picks a free one)")
    p.add_argument(
        "--owner-token",
        default=os.environ.get("RLHFLAB_OWNER_TOKEN"),
        help="token for the owner's status page (default: $RLHFLAB_OWNER_TOKEN, else a fresh one printed at start)",
    )
    p.add_argument("--log", action="store_true", help="log every request to stderr")

    p = sub.add_parser("add-labeler", help="create a labeler and print their sign-in token once")
    p.add_argument("--db", required=True, help="SQLite database file (created if missing)")
    p.add_argument("name", help="labeler name (letters, digits, . @ + - _)")
    p.add_argument(
        "--reissue",
        action="store_true",
        help="give an existing labeler a new token (the old one stops working)",
    )

    p = sub.add_parser("load", help="load prompts (demonstrations) or samples (rankings)")
    p.add_argument("--db", required=True, help="SQLite database file (created if missing)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help='JSONL of {"prompt"}: demonstration tasks')
    src.add_argument("--samples", help='JSONL of {"prompt", "responses": [K]}: ranking tasks')
    p.add_argument(
        "--per-item", type=int, default=1, help="labelers per item; 2+ makes agreement measurable (default 1)"
    )

    p = sub.add_parser("export", help="write rankings.jsonl and demonstrations.jsonl")
    p.add_argument("--db", required=True, help="SQLite database file")
    p.add_argument("--out", required=True, help="output directory")

    p = sub.add_parser("status", help="progress per labeler and inter-labeler agreement")
    p.add_argument("--db", required=True, help="SQLite database file")
    p.add_argument("--json", action="store_true", help="print the status as JSON")


def run_cli(args: argparse.Namespace) -> int:
    from rlhflab.label.db import LabelDB

    if args.action == "serve":
        return _serve(args)
    if args.action == "add-labeler":
        token = LabelDB(args.db).add_labeler(args.name, reissue=args.reissue)
        print(f"labeler {args.name}: token {token}")
        print("(shown once: hand it to the labeler; only its hash is stored)")
    elif args.action == "load":
        kind, path = ("demo", args.prompts) if args.prompts else ("rank", args.samples)
        added, skipped = LabelDB(args.db).load(kind, path, args.per_item)
        what = "demonstration" if kind == "demo" else "ranking"
        print(
            f"loaded {added} {what} items from {path}, each for {args.per_item} labeler(s)"
            + (f"; skipped {skipped} already loaded" if skipped else "")
        )
    elif args.action == "export":
        n_rank, n_demo = LabelDB(args.db, create=False).export(args.out)
        print(f"wrote {n_rank} rankings and {n_demo} demonstrations to {args.out}")
    elif args.action == "status":
        status = LabelDB(args.db, create=False).status()
        print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from rlhflab.label.db import LabelDB
    from rlhflab.label.server import make_server

    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be 0..65535, got {args.port}")
    is_new = not os.path.exists(args.db)
    server = make_server(LabelDB(args.db), args.host, args.port, args.owner_token, log=args.log)
    print(f"labeling app: {server.url}  (owner page: {server.url}owner)", flush=True)
    if is_new:
        print(f"created an empty database at {args.db}: add labelers and load items next")
    if not args.owner_token:
        print(f"owner token for this run: {server.owner_token}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
    return 0


def format_status(status: dict) -> str:
    items = status["items"]
    lines = [
        f"items: {items['rank']} to rank, {items['demo']} to demonstrate",
        "",
        f"{'labeler':<20} {'done':>6} {'assigned':>9}",
    ]
    lines += [f"{p['name']:<20} {p['done']:>6} {p['assigned']:>9}" for p in status["labelers"]]
    agr = status["agreement"]
    lines.append("")
    if agr["overall"] is None:
        lines.append("agreement: no item ranked by two labelers yet")
    else:
        lines.append(f"agreement: {agr['overall']:.1%} over {agr['comparisons']} comparisons")
        lines += [f"  {p['a']} ~ {p['b']}: {p['agreement']:.1%} on {p['items']} items" for p in agr["pairs"]]
    return "\n".join(lines)
