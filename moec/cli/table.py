"""Plain-text tables (and JSON) for terminal output."""

from __future__ import annotations

import json

import click


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


def format_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """Columns padded to width; ``align`` is one 'l'/'r' per column (numbers right by default)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if align is None:
        align = "".join("r" if rows and isinstance(rows[0][i], (int, float)) else "l" for i in range(len(headers)))
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(r, widths, align)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c) -> str:
    if isinstance(c, float):
        return f"{c:.4g}" if abs(c) < 1e4 else f"{c:,.0f}"
    return str(c)
