"""The terminal chat of `slmops model run`: multi-turn, streaming, through a ChatRunner."""

from __future__ import annotations

import sys
from typing import Any

import click

from slmops.errors import SlmopsError
from slmops.run.chat_session import ChatRunner


def interactive(runner: ChatRunner, system: str | None, exit_words: set[str]) -> None:
    """Read a turn, stream the answer, keep the history; Ctrl-C stops a reply, Ctrl-D or an exit word leaves."""
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    click.echo(
        f"Chatting with {runner.entry.name} ({runner.engine}). Type {', '.join(sorted(exit_words))} or Ctrl-D to leave; "
        "Ctrl-C stops a reply.",
        err=True,
    )
    while True:
        try:
            text = input(">>> ")
        except EOFError:
            click.echo("", err=True)
            return
        except KeyboardInterrupt:
            click.echo("", err=True)
            continue
        if text.strip().lower() in exit_words:
            return
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        parts: list[str] = []
        usage: dict[str, Any] = {}
        try:  # stream checks the turn first: a refused turn is dropped and the session goes on
            for piece in runner.stream(history, runner.options, usage):
                parts.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except SlmopsError as e:
            click.echo(f"\nslmops: error: {e}", err=True)
            history.pop()
            continue
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(parts)})
