"""Generate docs/hooks.md (from the hook specs' docstrings and the built-in plugins' Options) and docs/cli.md (from
the commands' help).
Run by `make docs`; a test fails when the committed pages are stale."""

import inspect
from pathlib import Path

import click

from slmops.plugin import hookspecs

HERE = Path(__file__).parent


def hooks_page() -> str:
    lines = [
        "# Hook reference",
        "",
        "Generated from `src/slmops/plugin/hookspecs.py` by `docs/gen_docs.py`; do not edit by hand.",
        "",
        inspect.getdoc(hookspecs) or "",
        "",
    ]
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith("register_"):
            lines += [f"## `{name}{inspect.signature(fn)}`", "", inspect.getdoc(fn) or "", ""]
    return "\n".join(lines + options_section())


def options_section() -> list[str]:
    """The built-in converters' and quantizers' own options (a plugin declares them as its Options class)."""
    from slmops.plugin import provided

    lines = [
        "## Options of the built-in plugins",
        "",
        "Given as `--option NAME.KEY=VALUE` or under `[plugins.NAME]` in slmops.toml; `slmops plugins` lists those of",
        "every loaded plugin.",
        "",
        "| option | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for row in provided.option_table():
        if row["plugin"].startswith("slmops."):
            lines.append(f"| `{row['option']}` | {row['type']} | {row['default']} | {row['meaning']} |")
    return lines + [""]


def cli_page() -> str:
    from slmops.cli import cli

    lines = ["# CLI reference", "", "Generated from the commands' help by `docs/gen_docs.py`; do not edit by hand.", ""]

    def walk(cmd: click.Command, path: list[str]) -> None:
        # The same page on any terminal, and in any process: click caches each command's help option with the names
        # of the first context that asked, so the page asks afresh with the names users see (the root's settings).
        cmd._help_option = None
        ctx = click.Context(
            cmd,
            info_name=" ".join(path),
            terminal_width=100,
            max_content_width=100,
            help_option_names=cli.context_settings["help_option_names"],
        )
        lines.extend([f"## `{' '.join(path)}`", "", "```", cmd.get_help(ctx).replace(" " * 2 + "\n", "\n"), "```", ""])
        if isinstance(cmd, click.Group):
            for name in sorted(cmd.commands):
                walk(cmd.commands[name], path + [name])

    # slmops's own commands only: a plugin installed where the docs are made (the tests' third-party one) adds its
    # commands to the group, and so to the group's help.
    added, others = cli.plugin_commands_added, {}
    cli.plugin_commands_added = True
    for name, cmd in list(cli.commands.items()):
        if not (cmd.callback and cmd.callback.__module__.startswith("slmops.")):
            others[name] = cli.commands.pop(name)
    try:
        walk(cli, ["slmops"])
    finally:
        cli.commands.update(others)
        cli.plugin_commands_added = added
    return "\n".join(lines)


def main() -> None:
    (HERE / "hooks.md").write_text(hooks_page())
    (HERE / "cli.md").write_text(cli_page())


if __name__ == "__main__":
    main()
