"""A small, self-contained HTML page: inline CSS, images as base64 data URIs, no script, no URL.

The report must open from a laptop on a plane, be mailed as one file and never fetch anything, so
everything it shows is inside the file.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 0 24px 48px;
       color: #1d2430; }
h1 { font-size: 22px; margin: 24px 0 4px; } h2 { font-size: 17px; margin: 30px 0 8px;
     border-bottom: 1px solid #d8dde6; padding-bottom: 4px; }
.sub { color: #5b6575; margin: 0 0 12px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #d8dde6; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f1f3f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: 12px; } img { max-width: 100%; border: 1px solid #e3e6ec; margin: 6px 0; }
.kind { font-weight: 600; white-space: nowrap; }
.nonfinite, .frozen { color: #b3261e; } .unchanged_rows, .stalled_elements { color: #8a5a00; }
.outlier_change, .spike { color: #6a3fb0; }
.ok { color: #22753a; font-weight: 600; }
.stopped_moving { color: #b3261e; } .lr_outlier { color: #6a3fb0; }
.advice { background: #fff8e6; border: 1px solid #e8c76a; border-radius: 6px; padding: 2px 16px 10px; }
.advice h2 { border: 0; } .advice li { margin: 6px 0; } .advice .why { color: #5b6575; font-size: 12px; }
figure { margin: 10px 0; } figcaption { color: #5b6575; font-size: 12px; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """Numbers in 4 significant digits; None as an empty cell."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def image(data: bytes, mime: str, alt: str, caption: str = "") -> str:
    src = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{src}" alt="{esc(alt)}">{cap}</figure>'


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], raw: Sequence[bool] = ()) -> str:
    """A table; cells are escaped unless their column is marked ``raw`` (already HTML)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    head = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            if i < len(raw) and raw[i]:
                cells.append(f"<td>{v}</td>")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                cells.append(f'<td class="num">{esc(fmt(v))}</td>')
            else:
                cells.append(f"<td>{esc(fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{head}<tbody>{''.join(body)}</tbody></table>"


def section(title: str, *parts: str, anchor: str = "") -> str:
    """A titled section; ``anchor`` makes it a link target (``report.html#anchor``)."""
    ident = f' id="{esc(anchor)}"' if anchor else ""
    return f"<section{ident}><h2>{esc(title)}</h2>{''.join(parts)}</section>"


def paragraph(text: str, cls: str = "") -> str:
    return f'<p class="{cls}">{esc(text)}</p>' if cls else f"<p>{esc(text)}</p>"


def page(title: str, subtitle: str, sections: Sequence[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f'<h1>{esc(title)}</h1><p class="sub">{esc(subtitle)}</p>' + "".join(sections) + "</body></html>\n"
    )
