"""HTML helpers of the run report (a leaf: it imports nothing from the report), and
the lenient JSONL reader the report pages share.

Every function returns an HTML fragment; model text is escaped.
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; unreadable lines are skipped (a report must not crash)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            rows.append(obj)
    return rows


def missing(text: str) -> str:
    return f'<p class="missing">Not shown: {escape(text)}</p>'


def figure(uri: str | None, alt: str, caption: str, when_missing: str) -> str:
    """The chart `uri` with its caption, or `missing(when_missing)` where there is no chart."""
    if uri is None:
        return missing(when_missing)
    return f'<figure><img src="{uri}" alt="{escape(alt)}"><figcaption>{caption}</figcaption></figure>'


def fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return escape(str(v))
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "nan"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if 0 < abs(v) < 0.01 else f"{v:.3f}"
    return escape(str(v))


def table(headers: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if isinstance(c, Raw) else fmt(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class Raw(str):
    """A table cell that is already HTML."""


def text_cell(s: str) -> Raw:
    return Raw(f'<span class="text">{escape(s) if s else "<em>(empty)</em>"}</span>')


def ci_cell(s: dict, key: str, lo: str, hi: str, m: str) -> str:
    """`key` of model `m` in `s` with its interval `lo`–`hi` (keys with `{m}`), two decimals; – when absent."""
    v = s.get(key.format(m=m))
    if v is None:
        return "–"
    return f"{v:.2f} [{s.get(lo.format(m=m), v):.2f}–{s.get(hi.format(m=m), v):.2f}]"
