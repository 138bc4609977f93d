"""The report as a list of blocks (headings, paragraphs, tables, figures), rendered twice: a self-contained HTML
page (figures embedded as base64, no server or network needed) and a Markdown summary for CI job pages (figures
linked as the PNG files beside it). One content, two renderings: the two never disagree."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Union

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
tr.shipped td { background: #fff1dc; font-weight: 600; }
tr.reference td { font-style: italic; color: #555; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0 1.2em; }
.note { color: #666; font-size: 0.9em; }
"""


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Table:
    """Rows of cells; `marks` tags a row ("shipped", "reference") for the HTML style and the Markdown bold."""

    headers: list[str]
    rows: list[list[str]]
    marks: list[str] = field(default_factory=list)


@dataclass
class Figure:
    filename: str
    caption: str
    data: bytes


Block = Union[Heading, Paragraph, Table, Figure]


def markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(title: str, blocks: list[Block]) -> str:
    lines = [f"# {title}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            lines += [block.text, ""]
        elif isinstance(block, Figure):
            lines += [f"![{block.caption}]({block.filename})", ""]
        else:
            lines += ["| " + " | ".join(map(markdown_cell, block.headers)) + " |"]
            lines += ["|" + "---|" * len(block.headers)]
            marks = block.marks or [""] * len(block.rows)
            for row, mark in zip(block.rows, marks):
                cells = [markdown_cell(c) for c in row]
                if mark == "shipped":
                    cells = [f"**{c}**" if c else c for c in cells]
                elif mark == "reference":
                    cells = [f"_{c}_" if c else c for c in cells]
                lines += ["| " + " | ".join(cells) + " |"]
            lines += [""]
    return "\n".join(lines)


def html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    marks = table.marks or [""] * len(table.rows)
    body = "".join(
        f'<tr class="{mark}">' + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
        for row, mark in zip(table.rows, marks)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def to_html(title: str, blocks: list[Block]) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Figure):
            encoded = base64.b64encode(block.data).decode("ascii")
            parts.append(
                f'<figure><img alt="{html.escape(block.caption)}" src="data:image/png;base64,{encoded}">'
                f'<figcaption class="note">{html.escape(block.caption)}</figcaption></figure>'
            )
        else:
            parts.append(html_table(block))
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(parts) + "\n</body></html>\n"
    )
