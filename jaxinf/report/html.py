"""A self-contained HTML report of explanations (`jaxinf.report.select.explain`): inline CSS, no scripts, no
external resources, so it opens offline and can be mailed as one file.

Per query: its text, then one column per method with the top-k training rows (most helpful: highest scores)
and the bottom-k (most harmful: lowest scores). Each token of a training row is shaded by its contribution
s[b, t] to the row's score: green pushes the score up (helps the query), red pushes it down; opacity is
|s[b, t]| / max |s| over the rows shown for that method and query. Prompt tokens carry no loss, hence no shade.
"""

from __future__ import annotations

import html
from typing import Optional, Sequence

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:20px;color:#1d2330;background:#fafbfc}
h1{font-size:21px;margin:0 0 4px} h2{font-size:17px;margin:26px 0 8px} h3{font-size:15px;margin:0 0 6px}
h4{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:#5a6170;margin:10px 0 4px}
.meta{color:#5a6170;font-size:13px;margin:2px 0}
.legend span{padding:1px 6px;border-radius:3px;margin-right:6px}
.query{background:#fff;border:1px solid #d7dbe3;border-radius:6px;padding:10px 12px;font-size:14px}
.methods{display:grid;gap:12px;margin-top:10px;overflow-x:auto}
.method{background:#fff;border:1px solid #d7dbe3;border-radius:6px;padding:10px;min-width:0}
.row{border-top:1px solid #eceef2;padding:6px 0 8px;font-size:12.5px}
.head{font-size:12px;color:#3c4352;margin-bottom:3px}
.idx{font-weight:600} .score{font-family:ui-monospace,Menlo,Consolas,monospace}
.grp{display:inline-block;padding:0 6px;border-radius:9px;background:#e8ecf4;color:#2b3550;font-size:11px}
.grp.match{background:#cfe8d4;color:#1b5e20}
.text{white-space:pre-wrap;word-break:break-word;line-height:1.55}
.tok{border-radius:2px} .prompt{color:#8a909c} .resp{font-weight:500}
.qline{font-size:14px;margin:4px 0 8px}
.note{color:#8a909c;font-size:12px;font-style:italic}
"""


def _shade(value: float, scale: float) -> str:
    if scale <= 0 or value == 0:
        return ""
    a = min(1.0, abs(value) / scale) * 0.85
    rgb = "34,160,70" if value > 0 else "214,48,49"
    return f"background:rgba({rgb},{a:.3f})"


def _piece(text: str) -> str:
    return html.escape(text.replace("\n", "\u21b5\n"))


def _tokens_html(entry: dict, scale: Optional[float]) -> str:
    scores = entry.get("token_scores")
    parts = []
    for i, (tok, target) in enumerate(zip(entry["tokens"], entry["target"])):
        cls = "tok resp" if target else "tok prompt"
        if scores is not None and scale is not None:
            s = scores[i]
            parts.append(f'<span class="{cls}" data-score="{s:.6g}" style="{_shade(s, scale)}" '
                         f'title="{s:+.4g}">{_piece(tok)}</span>')
        else:
            parts.append(f'<span class="{cls}">{_piece(tok)}</span>')
    return "".join(parts)


def _row_html(entry: dict, scale: Optional[float], query_group: Optional[str]) -> str:
    match = " match" if query_group is not None and entry["group"] == query_group else ""
    return (f'<div class="row" data-index="{entry["index"]}"><div class="head"><span class="idx">#{entry["index"]}'
            f'</span> <span class="grp{match}">{html.escape(entry["group"])}</span> score '
            f'<span class="score">{entry["score"]:+.4g}</span></div>'
            f'<div class="text">{_tokens_html(entry, scale)}</div></div>')


def _method_html(name: str, result: dict, query_group: Optional[str]) -> str:
    rows = result["top"] + result["bottom"]
    scale = None
    if result.get("per_token"):
        scale = max((abs(s) for r in rows for s in r.get("token_scores", [])), default=0.0)
    note = f'<div class="note">{html.escape(result["note"])}</div>' if result.get("note") else ""
    top = "".join(_row_html(r, scale, query_group) for r in result["top"])
    bottom = "".join(_row_html(r, scale, query_group) for r in result["bottom"])
    return (f'<div class="method" data-method="{html.escape(name)}"><h3>{html.escape(name)}</h3>{note}'
            f'<h4>Most helpful (top {len(result["top"])})</h4>{top}'
            f'<h4>Most harmful (lowest {len(result["bottom"])})</h4>{bottom}</div>')


def render_html(explanations: Sequence[dict], *, title: str = "jaxinf: which training rows made the model say this?",
                meta: Sequence[str] = ()) -> str:
    """The report as one HTML string (see the module doc); `meta`: lines shown under the title."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    body += [f'<p class="meta">{html.escape(line)}</p>' for line in meta]
    body.append('<p class="meta legend">score = &lt;P g<sub>query</sub>, g<sub>row</sub>&gt;, larger = the row '
                'helps the query more. Token shading: <span style="background:rgba(34,160,70,.6)">raises the '
                'score</span><span style="background:rgba(214,48,49,.6)">lowers it</span>; the shades of a row sum '
                'to its score. Grey = prompt (no loss). Green group badge = the query\'s own group.</p>')
    for i, ex in enumerate(explanations):
        q = ex["query"]
        group = q.get("group")
        label = f"Query {i + 1}" + (f" (test row {q['index']}, group {group})" if group else "")
        body.append(f'<section class="explanation" data-query="{i}"><h2>{html.escape(label)}</h2>')
        body.append(f'<p class="qline"><b>Prompt:</b> {html.escape(q.get("prompt", ""))} &nbsp; <b>Completion:</b> '
                    f'{html.escape(q.get("response", ""))}</p>')
        body.append(f'<div class="query text">{_tokens_html(q, None)}</div>')
        n = max(1, len(ex["methods"]))
        body.append(f'<div class="methods" style="grid-template-columns:repeat({n},minmax(300px,1fr))">')
        body += [_method_html(name, res, group) for name, res in ex["methods"].items()]
        body.append("</div></section>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>" + html.escape(title) +
            "</title><style>" + _CSS + "</style></head><body>" + "\n".join(body) + "</body></html>\n")


def write_report(path: str, explanations: Sequence[dict], **kwargs) -> str:
    """Write `render_html(...)` to `path` (atomically); returns the path."""
    from jaxinf.workdir import write_text

    return write_text(path, render_html(explanations, **kwargs))
