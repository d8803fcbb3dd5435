"""Plain-text tables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["Column", "format_cell", "markdown_table"]

Column = tuple[str, str, str]  # (row key, header, format spec)


def format_cell(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec``; missing or NaN values show as an em dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A GitHub-flavoured markdown table of ``rows`` with the given columns."""
    header = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(format_cell(r.get(k), f) for k, _, f in columns) + " |"
            for r in rows]
    return "\n".join([header, rule, *body]) + "\n"
