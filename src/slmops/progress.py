"""Steps with timings on stderr, so stdout stays for results (tables, JSON, answers)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console

console = Console(stderr=True, highlight=False)
quiet = False
_running: list[tuple[str, Any]] = []  # the steps running now (title, their spinner), innermost last


@contextlib.contextmanager
def step(title: str) -> Iterator[None]:
    """Show a spinner while the step runs, then one line with its time (or its failure)."""
    start = time.perf_counter()
    if quiet:
        yield
        return
    try:
        with console.status(f"{title}...") as status:
            _running.append((title, status))
            try:
                yield
            finally:
                _running.pop()
    except BaseException:
        console.print(f"[red]x[/red] {title} (failed after {time.perf_counter() - start:.1f}s)")
        raise
    console.print(f"[green]v[/green] {title} [dim]{time.perf_counter() - start:.1f}s[/dim]")


def note(text: str) -> None:
    if not quiet:
        console.print(f"  {text}")


def count(done: int, total: int, what: str) -> None:
    """How far the innermost running step has got, shown in its line: "TITLE... 12/48 windows scored"."""
    if _running and not quiet:
        title, status = _running[-1]
        status.update(f"{title}... {done}/{total} {what}")
