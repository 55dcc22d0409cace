"""Results on stdout: a readable table by default, JSON with --json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

stdout = Console(highlight=False, soft_wrap=False)


def emit_json(data: Any) -> None:
    """Strict JSON: NaN and infinities become null (Python would print a bare NaN, which JSON parsers refuse)."""
    from .fsutil import strict_json

    print(json.dumps(strict_json(json.loads(json.dumps(data, default=str))), indent=2, allow_nan=False))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> None:
    t = Table(title=title, show_lines=False)
    for c in columns:
        t.add_column(c, overflow="fold")  # a long value (a model's name, a path) wraps in its cell, never cut with …
    for row in rows:
        t.add_row(*(Text(_cell(row.get(c))) for c in columns))  # Text: no markup parsing of '[/INST]'
    stdout.print(t)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
