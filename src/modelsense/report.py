"""A static, self-contained HTML report (figures embedded as base64 PNG; no server needed)."""

from __future__ import annotations

import base64
import datetime as _dt
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelsense.errors import shown
from modelsense.runs import atomic_write_bytes


@dataclass
class Section:
    """One section of a report: a heading, a paragraph, a metrics table and figures."""

    title: str
    text: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    run_dir: str = ""
    #: a table with a header row (e.g. metrics of several runs side by side), shown before the metrics
    table: list[list[Any]] = field(default_factory=list)


def _plain(v: Any) -> str:
    """A metric as text: floats (numpy's too) to 4 significant digits, containers element by element."""
    if hasattr(v, "item") and getattr(v, "ndim", None) == 0:  # a numpy / torch scalar
        v = v.item()
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return f"[{len(v)} values]" if len(v) > 12 else "[" + ", ".join(_plain(x) for x in v) + "]"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_plain(x)}" for k, x in v.items())
    return shown(v) if hasattr(v, "shape") else str(v)


def _fmt(v: Any) -> str:
    return html.escape(_plain(v))


def render(title: str, sections: list[Section]) -> str:
    """The HTML page of a report: `title`, then per section its heading, run directory, text, tables
    and figures (PNG inline)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "img{max-width:100%;border:1px solid #eee;margin:.5em 0}h2{border-bottom:1px solid #ddd}"
        ".dir{color:#777;font-size:90%}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='dir'>generated {_dt.datetime.now().isoformat(timespec='seconds')}</p>",
    ]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.run_dir:
            parts.append(f"<p class='dir'>run directory: {html.escape(s.run_dir)}</p>")
        if s.text:
            parts.append(f"<p>{html.escape(s.text)}</p>")
        if s.table:
            head, *body = s.table
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in head) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in body)
                         + "</table>")
        if s.metrics:
            rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in s.metrics.items())
            parts.append(f"<table>{rows}</table>")
        for fig in s.figures:
            data = base64.b64encode(Path(fig).read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(Path(fig).stem)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str | Path, title: str, sections: list[Section]) -> Path:
    """Write the HTML of `render(title, sections)` atomically to `path`; return `path`."""
    path = Path(path)
    atomic_write_bytes(path, render(title, sections).encode())
    return path
