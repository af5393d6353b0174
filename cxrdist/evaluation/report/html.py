"""The report page's HTML: the stylesheet, the page skeleton and small escaping helpers.

Every piece of text that comes from data (label names, paths, experiment names) goes through
`esc`; the page loads nothing from the network (figures are relative PNG files next to it).
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image

from cxrdist.evaluation.figures import DENSITY

STYLE = """
:root { --ink: #1d2733; --muted: #5b6775; --line: #dde3ea; --accent: #1f6feb; --soft: #f5f7fa; --good: #1a7f37; --bad: #b42318; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.55 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: var(--ink); background: #fff;
       overflow-wrap: normal; word-break: normal; hyphens: manual; }
header { background: linear-gradient(120deg, #0f2a44, #1f4e79); color: #fff; padding: 28px 40px 22px; }
header h1 { margin: 0 0 4px; font-size: 26px; font-weight: 650; letter-spacing: .2px; }
header p { margin: 2px 0; color: #cfe0f1; }
nav { position: sticky; top: 0; z-index: 2; background: #fff; border-bottom: 1px solid var(--line); padding: 8px 40px;
      display: flex; flex-wrap: wrap; gap: 4px 16px; font-size: 13.5px; }
nav a { color: var(--accent); text-decoration: none; }
nav a:hover { text-decoration: underline; }
main { max-width: 1180px; margin: 0 auto; padding: 10px 40px 60px; }
section { margin-top: 34px; }
h2 { font-size: 20px; margin: 0 0 6px; padding-bottom: 6px; border-bottom: 2px solid var(--line); }
h3 { font-size: 16px; margin: 20px 0 6px; }
p.explain { color: var(--muted); margin: 4px 0 12px; max-width: 900px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(190px, 1fr)); gap: 14px; margin-top: 18px; }
.card { background: var(--soft); border: 1px solid var(--line); border-radius: 10px; padding: 12px 16px; }
.card .value { font-size: 24px; font-weight: 650; }
.card .label { color: var(--muted); font-size: 12.5px; text-transform: uppercase; letter-spacing: .5px; }
.card .sub { color: var(--muted); font-size: 12.5px; }
figure { margin: 10px 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; background: #fff; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; max-width: 900px; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13.5px; margin: 6px 0 14px; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: right; vertical-align: top; }
th { background: var(--soft); font-weight: 600; position: sticky; top: 0; }
th.l, td.l { text-align: left; }
td .ci, .nowrap { white-space: nowrap; }
tr.macro td { font-weight: 650; background: #eef4fd; }
td.na { color: #9aa5b1; }
td .ci { color: var(--muted); font-size: 12px; }
.flag { color: var(--bad); font-weight: 650; }
.pos { color: var(--good); } .neg { color: var(--bad); }
.note { background: #fff8e6; border: 1px solid #f3d27a; border-radius: 8px; padding: 10px 14px; margin: 10px 0; }
.split { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.split > div { flex: 1 1 280px; min-width: 0; }
.split > div:first-child { flex: 0 1 auto; }
.grid2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(460px, 1fr)); gap: 18px; align-items: start; }
code { background: var(--soft); padding: 1px 5px; border-radius: 4px; font-size: 13px; }
header code { background: rgba(255,255,255,.12); color: #fff; }
footer { color: var(--muted); font-size: 12.5px; border-top: 1px solid var(--line); margin-top: 40px; padding-top: 12px; }
table.wide { font-size: 12.5px; }
table.wide th, table.wide td { padding: 4px 6px; }
@media (max-width: 900px) {
  header { padding: 20px 16px 16px; }
  nav { padding: 8px 16px; }
  main { padding: 10px 16px 40px; }
  table { font-size: 12.5px; }
  th, td { padding: 4px 6px; }
  .grid2 { grid-template-columns: minmax(0, 1fr); }
}
@media print {
  nav { display: none; }
  main { max-width: none; padding: 0; }
  .table-wrap { overflow: visible; }
  th { position: static; }
  table { font-size: 10px; }
  th, td { padding: 3px 4px; }
}
"""
# Tables: cells wrap only between words (a value and its interval may go onto two lines, an interval never splits), so a
# table shrinks to the page down to its longest word per column; nothing may split a word (no overflow-wrap: anywhere).
WIDE_TABLE_COLUMNS = 8  # more columns than this: smaller type and padding


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def signed(value: float | None, digits: int = 3) -> str:
    """A gain with its sign and a colour class."""
    if value is None or not math.isfinite(value):
        return '<span class="na">–</span>'
    cls = "pos" if value > 0 else "neg" if value < 0 else ""
    return f'<span class="{cls}">{value:+.{digits}f}</span>'


def percent(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def auc_cell(value: float | None, interval: Sequence[float] | None = None, flag: str = "") -> str:
    """An AUC table cell (HTML): the value, and its interval in small print; `flag` (HTML, e.g. `few_flag`) after it."""
    if value is None or not math.isfinite(value):
        return '<td class="na">–</td>'
    ci = f' <span class="ci">({interval[0]:.3f}–{interval[1]:.3f}){flag}</span>' if interval else ""
    return f"<td>{value:.3f}{ci}</td>"


FEW_MARK = "†"


def few_flag(count: int | None, minimum: int, what: str = "positives") -> str:
    """The mark after an interval that rests on fewer than `minimum` positives (or negatives), with the count on hover."""
    if count is None or count >= minimum:
        return ""
    return f'<span class="flag" title="{count} {esc(what)}: fewer than {minimum}">{FEW_MARK}</span>'


def table(header: Sequence[str], rows: Iterable[Sequence[str]], row_classes: Sequence[str] | None = None, text_columns: int = 1) -> str:
    """Header cells are escaped; row cells are HTML already (build them with esc/auc_cell).

    The first `text_columns` columns hold text (left-aligned); the rest hold numbers (right-aligned).
    """
    def th(j: int, h: str) -> str:
        return f'<th class="l">{esc(h)}</th>' if j < text_columns else f"<th>{esc(h)}</th>"

    def td(j: int, cell: str) -> str:
        if cell.startswith("<td"):
            return cell
        return f'<td class="l">{cell}</td>' if j < text_columns else f"<td>{cell}</td>"

    head = "".join(th(j, h) for j, h in enumerate(header))
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = "".join(td(j, cell) for j, cell in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    wide = ' class="wide"' if len(header) > WIDE_TABLE_COLUMNS else ""
    return f'<div class="table-wrap"><table{wide}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def figure(src: str | Path, alt: str, caption: str = "") -> str:
    """`src`: a PNG saved by `figures.save` (a Path in the page's figures/ folder), shown at its size in inches (96 CSS px
    each; it holds DENSITY pixels per CSS px) so that its text shows at the size it was set in (figures.MIN_FONT_PT at
    least) and shrinks only on a narrower page; or a page-relative URL (a str), shown at its pixel size."""
    width = ""
    if isinstance(src, Path):
        if src.is_file():  # (a figure that was not drawn shows as a missing image, which the report test catches)
            with Image.open(src) as image:
                width = f' width="{round(image.width / DENSITY)}"'
        src = f"{src.parent.name}/{src.name}"
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img src="{esc(src)}"{width} alt="{esc(alt)}">{cap}</figure>'


def note(text_html: str) -> str:
    return f'<div class="note">{text_html}</div>'


def card(label: str, value: str, sub: str = "") -> str:
    sub_html = f'<div class="sub">{sub}</div>' if sub else ""
    return f'<div class="card"><div class="label">{esc(label)}</div><div class="value">{value}</div>{sub_html}</div>'


def section(anchor: str, title: str, explain: str, body: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2><p class="explain">{explain}</p>{body}</section>'


def page(title: str, subtitle_lines: Sequence[str], cards_html: str, sections: Sequence[tuple[str, str, str]], footer: str) -> str:
    """sections: (anchor, nav title, section html)."""
    nav = "".join(f'<a href="#{esc(anchor)}">{esc(name)}</a>' for anchor, name, _ in sections)
    subtitle = "".join(f"<p>{line}</p>" for line in subtitle_lines)
    body = "".join(html_ for _, _, html_ in sections)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<header><h1>{esc(title)}</h1>{subtitle}</header>
<nav>{nav}</nav>
<main>
<div class="cards">{cards_html}</div>
{body}
<footer>{footer}</footer>
</main>
</body>
</html>
"""
