"""Results on stdout: a readable table by default, JSON with --json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from slmops.host.fsutil import human_bytes, strict_json  # noqa: F401 (human_bytes: output's to callers)

stdout = Console(highlight=False, soft_wrap=False)


def emit_json(data: Any) -> None:
    """Strict JSON: NaN and infinities become null (Python would print a bare NaN, which JSON parsers refuse)."""
    print(json.dumps(strict_json(json.loads(json.dumps(data, default=str))), indent=2, allow_nan=False))


NAME_WIDTH = 40  # the first column (a model's, a plugin's or a check's name) is kept whole up to this width


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> None:
    """rows as a table that fits the terminal (80 columns and up): the first column, the row's name, on one line;
    the others wrap in their cells (a path, a long detail), never cut with an ellipsis."""
    t = Table(title=title, show_lines=False)
    cells = [[Text(_cell(row.get(c))) for c in columns] for row in rows]  # Text: no markup parsing of '[/INST]'
    for i, c in enumerate(columns):
        whole = i == 0 and max([len(c), *(len(r[0].plain) for r in cells)]) <= NAME_WIDTH
        t.add_column(c, overflow="fold", no_wrap=whole)  # no_wrap: rich narrows the other columns first
    for r in cells:
        t.add_row(*r)
    stdout.print(t)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)
