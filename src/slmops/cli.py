"""The `slmops` command line. Commands stay thin: each calls one module that does the work."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from slmops import output, progress
from slmops.config import SCHEMA, Config, load_config
from slmops.errors import SlmopsError, UsageError
from slmops.host import machine


class State:
    def __init__(self, config_path: str | None):
        self.config_path = Path(config_path) if config_path else None
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config


pass_state = click.make_pass_decorator(State)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


class Commands(click.Group):
    """slmops's commands and those plugins add (the register_commands hook), added the first time the group is
    asked for a command: `cli` is whole however it is invoked, by main() or in-process by click's CliRunner."""

    plugin_commands_added = False

    def add_plugin_commands(self) -> None:
        if not self.plugin_commands_added:
            self.plugin_commands_added = True
            from slmops.plugin.plugin_manager import call_each

            call_each("register_commands", lambda plugin: {"cli": self})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self.add_plugin_commands()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.add_plugin_commands()
        return super().list_commands(ctx)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="slmops")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="slmops.toml to use (default: found by walking up).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, debug: bool, quiet: bool) -> None:
    """slmops: fine-tuned small language model to a quantized ONNX Runtime GenAI model, registered with
    Foundry Local, chatting and measured."""
    from slmops.host.cpus import check_thread_settings
    from slmops.host.fsutil import clean_home

    progress.quiet = quiet
    ctx.obj = State(config_path)
    check_thread_settings()
    clean_home()


@cli.command()
@json_option
def plugins(as_json: bool) -> None:
    """List loaded plugins (package, version, hooks) and the implementations each provides."""
    from slmops.plugin.plugin_manager import plugin_table, problems
    from slmops.plugin.provided import option_table, table

    rows, offered, options = plugin_table(), table(), option_table()
    if as_json:
        output.emit_json(
            {"plugins": rows, "implementations": offered, "options": options, "errors": [e.__dict__ for e in problems]}
        )
        return
    output.table(rows, ["name", "package", "version", "hooks"], title="plugins")
    output.table(offered, ["role", "name", "plugin", "package"], title="implementations")
    if options:
        output.table(options, ["option", "type", "default", "meaning"], title="options (--option NAME.KEY=VALUE)")
    for e in problems:
        click.echo(f"disabled: {e.name} ({e.package}){' in ' + e.hook if e.hook else ''}: {e.error}", err=True)


def _pip(*args: str) -> None:
    """pip in slmops's own environment (the interpreter running this command), its output shown as it comes."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "pip", *args])
    if done.returncode != 0:
        raise SlmopsError(f"pip {args[0]} failed (exit status {done.returncode}); see pip's message above")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("packages", nargs=-1)
@click.option("-U", "--upgrade", is_flag=True, help="Upgrade packages to their latest version.")
@click.option(
    "-e",
    "--editable",
    type=click.Path(exists=True, file_okay=False),
    help="Install a plugin project from a local folder in editable mode.",
)
@click.option("--force-reinstall", is_flag=True, help="Reinstall even if already up to date.")
def install(packages: tuple[str, ...], upgrade: bool, editable: str | None, force_reinstall: bool) -> None:
    """Install plugin PACKAGES (pip specifiers, paths, or pip options) into slmops's own environment."""
    if not packages and not editable:
        raise UsageError("name a package to install, e.g. `slmops install slmops-myplugin`")
    args = [
        "install",
        *(["--upgrade"] if upgrade else []),
        *(["--force-reinstall"] if force_reinstall else []),
        *(["--editable", editable] if editable else []),
        *packages,
    ]
    _pip(*args)


@cli.command()
@click.argument("packages", nargs=-1, required=True)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def uninstall(packages: tuple[str, ...], yes: bool) -> None:
    """Uninstall plugin PACKAGES from slmops's own environment."""
    if "slmops" in {p.lower() for p in packages}:
        raise UsageError("`slmops uninstall slmops` would remove slmops itself; use pip for that")
    from packaging.utils import canonicalize_name

    from slmops.doctor import own_dependencies

    needed = own_dependencies() | {"pip"}  # pip: `slmops install` runs it
    refused = [p for p in packages if not p.startswith("-") and canonicalize_name(p) in needed]
    if refused:
        raise UsageError(
            f"{', '.join(refused)} {'is' if len(refused) == 1 else 'are'} needed by slmops itself; "
            "`slmops uninstall` removes plugins only"
        )
    _pip("uninstall", *(["-y"] if yes else []), *packages)


@cli.command("config")
@json_option
@pass_state
def show_config(state: State, as_json: bool) -> None:
    """Print the effective settings and where each came from."""
    cfg = state.config
    rows = [
        {"key": f"{s}.{k}", "value": cfg.values[s][k], "from": cfg.origin[f"{s}.{k}"], "meaning": SCHEMA[s][k][2]}
        for s in SCHEMA
        for k in SCHEMA[s]
    ]
    rows += [
        {"key": f"plugins.{name}.{k}", "value": v, "from": cfg.origin.get(f"plugins.{name}.{k}", ""), "meaning": ""}
        for name, table in cfg.plugins.items()
        for k, v in table.items()
    ]
    if as_json:
        output.emit_json({"file": str(cfg.path) if cfg.path else None, "settings": rows})
    else:
        output.table(
            rows, ["key", "value", "from", "meaning"], title=f"config: {cfg.path or 'defaults (no slmops.toml found)'}"
        )


@cli.command()
@json_option
def doctor(as_json: bool) -> None:
    """Check Python, the installed stack, the runtimes, RAM and disk."""
    from slmops.doctor import checks

    rows = checks()
    if as_json:
        output.emit_json(rows)
    else:
        output.table(rows, ["check", "status", "detail"])
    if any(r["status"] == "fail" for r in rows):
        raise SlmopsError("doctor: a requirement failed (see the rows marked fail)")


def convert_options(f=None, *, auto: bool = False):
    """The conversion flags shared by convert and deploy; None means 'from slmops.toml'."""
    if f is None:
        return lambda g: convert_options(g, auto=auto)
    # The values come from what the loaded plugins offer; they are checked when the command runs (`slmops plugins`).
    opts = [
        click.option(
            "--precision",
            help="Weight precision: fp32, fp16, int8, int4 or what a plugin adds"
            + (", or auto (the smallest build that passes validation)." if auto else "."),
        ),
        click.option("--device", help="Target device (default cpu)."),
        click.option("--provider", help="Execution provider (default CPUExecutionProvider)."),
        click.option(
            "--block-size", type=click.Choice(["16", "32", "64", "128", "256"]), help="Quantization block size."
        ),
        click.option("--symmetric/--asymmetric", default=None, help="Symmetric quantization or with zero points."),
        click.option(
            "--algorithm",
            help="int4 algorithm: auto (default: gguf for a GGUF source, gptq for a float one), gptq (error-"
            "compensating rounding, Q4_0 to Q8_0 blocks by measured error within llama.cpp Q4_K_M's bytes), gguf (a GGUF "
            "source's own blocks, exact), imatrix (searched scale and float min per block of 32; needs --asymmetric), "
            "the builder's rtn, rtn_last and k_quant variants, hqq (slow on CPU; needs --asymmetric), or a plugin's. "
            "int8: auto (q8_0 for a float source: every weight, embedding included, in llama.cpp's Q8_0 blocks) or rtn.",
        ),
        click.option(
            "--calibration",
            type=click.Path(),
            help="JSONL file of your own text (rows with text, or prompt and expected) for gptq, imatrix and the "
            "outlier channels, instead of the shipped text.",
        ),
        click.option("--accuracy-level", type=click.IntRange(0, 4), help="MatMulNBits accuracy level (0: default)."),
        click.option(
            "--target",
            type=click.Choice(machine.TARGETS),
            help="native (default): this machine's fastest code (the GGUF kernel where it runs); portable: no native "
            "code, the folder runs wherever ONNX Runtime GenAI runs; or the platform the folder is for "
            f"({', '.join(machine.NAMED_TARGETS)}): native code where it is this machine's, else portable.",
        ),
        click.option(
            "--option",
            "plugin_option",
            multiple=True,
            metavar="PLUGIN.KEY=VALUE",
            help="A plugin's own option (as [plugins.PLUGIN] in slmops.toml; `slmops plugins` lists them), e.g. "
            "gptq.learned_scales=100. Repeat for several.",
        ),
        click.option(
            "--backend", help="Converter plugin by name (see `slmops plugins`); default: the cheapest that fits."
        ),
        click.option(
            "--quantizer", help="Quantizer plugin by name (see `slmops plugins`); default: the cheapest route."
        ),
        click.option("--adapter", type=click.Path(), help="PEFT LoRA adapter folder to apply."),
        click.option(
            "--adapter-mode",
            type=click.Choice(["merge", "adapter"]),
            help="merge (default): the LoRA into the weights; adapter: keep the base as it is and write the LoRA as an ORT GenAI adapter file (adapters/NAME.onnx_adapter), switched on at run time.",
        ),
        click.option(
            "--trust-remote-code", is_flag=True, default=None, help="Allow the checkpoint's own Python code to run."
        ),
        click.option(
            "--force",
            "adapter_force",
            is_flag=True,
            default=None,
            help="Apply --adapter even where its adapter_config.json names a base of another architecture.",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def apply_convert_flags(cfg: Config, flags: dict[str, Any]) -> None:
    for key in (
        "precision",
        "device",
        "provider",
        "symmetric",
        "algorithm",
        "accuracy_level",
        "backend",
        "quantizer",
        "calibration",
        "target",
    ):
        cfg.override(f"convert.{key}", flags.get(key), "command line")
    if flags.get("block_size"):
        cfg.override("convert.block_size", int(flags["block_size"]), "command line")
    cfg.override("model.adapter", flags.get("adapter"), "command line")
    cfg.override("model.adapter_mode", flags.get("adapter_mode"), "command line")
    cfg.override("model.trust_remote_code", flags.get("trust_remote_code"), "command line")
    cfg.override("model.adapter_force", flags.get("adapter_force"), "command line")
    for assignment in flags.get("plugin_option") or ():
        cfg.set_plugin_option(assignment, "command line")


@cli.command()
@click.argument("source", required=False)
@convert_options
@click.option(
    "--output",
    "-o",
    "output_dir",
    type=click.Path(file_okay=False),
    help="Output folder (default: slmops's build cache).",
)
@click.option(
    "--config", "olive_config", type=click.Path(dir_okay=False), help="An Olive workflow JSON (the guide's Method 2)."
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="warning",
    help="Log level of Olive and the builder.",
)
@click.option("--dry-run", is_flag=True, help="Show the route (converter, quantizer, cache folder) and build nothing.")
@json_option
@pass_state
def convert(
    state: State,
    source: str | None,
    output_dir: str | None = None,
    olive_config: str | None = None,
    log_level: str = "warning",
    dry_run: bool = False,
    as_json: bool = False,
    **flags: Any,
) -> None:
    """Convert SOURCE (a checkpoint folder, a GGUF file, or the default model) to a verified ORT GenAI model."""
    from slmops import tables
    from slmops.build import convert as conv

    _set_log_level(log_level)
    cfg = state.config
    cfg.override("model.source", source, "command line")
    apply_convert_flags(cfg, flags)
    cfg.override("convert.output", output_dir, "command line")
    if olive_config:
        from slmops.build.olive_config import apply_to

        apply_to(cfg, Path(olive_config))
    if cfg.get("convert.precision") == "auto":  # auto is deploy's search; one build starts where the guide does
        cfg.override("convert.precision", "int4", "auto (convert builds one precision: int4, as the guide recommends)")
    args = (
        cfg.get("model.source"),
        cfg.convert_options(),
        cfg.get("convert.backend"),
        cfg.get("convert.output") or None,
        cfg.get("convert.quantizer"),
    )
    if dry_run:
        route = conv.route(*args)
        output.emit_json(route) if as_json else tables.route(route)
        return
    build = conv.convert(*args)
    output.emit_json(build.to_json()) if as_json else tables.build(build)


def _set_log_level(level: str) -> None:
    import logging

    for name in ("olive", "onnxruntime", "transformers"):
        logging.getLogger(name).setLevel(level.upper())
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", level)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> None:
    """Entry point: every failure is one line on stderr and a non-zero exit; --debug shows the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("SLMOPS_DEBUG"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")  # the builder's per-tensor bars drown our steps
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    # rtn_last graphs make onnx_ir warn about shared lm_head inputs; verification checks the graph anyway.
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    # SIGTERM unwinds like an exception, so staging folders are removed and child processes killed on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        rv = cli.main(args=argv, prog_name="slmops", standalone_mode=False)
        sys.exit(rv if isinstance(rv, int) else 0)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        print("slmops: interrupted; nothing half-written was kept", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as e:
        if debug:
            raise
        hint = " (see --help)" if isinstance(e, click.UsageError) else ""
        print(f"slmops: error: {_one_line(e.format_message())}{hint}", file=sys.stderr)
        sys.exit(e.exit_code)
    except SlmopsError as e:
        if debug:
            raise
        print(f"slmops: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:  # the disk or the file system said no: say where, and what usually fixes it
        if debug:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(
            f"slmops: error: {e.strerror or _one_line(e)}{where}; check that the folder exists, is writable and has free space",
            file=sys.stderr,
        )
        sys.exit(1)
    except Exception as e:  # a bug or a plugin failure: still one line, the traceback on --debug
        if debug:
            raise
        from slmops.plugin.provided import blame

        where = blame(e)
        print(
            f"slmops: error: {where + ': ' if where else ''}{type(e).__name__}: {_one_line(e)} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        sys.exit(1)


@cli.group()
def templates() -> None:
    """Prompt-template families: list, show, render, check a model."""


@templates.command("ls")
@json_option
def templates_ls(as_json: bool) -> None:
    """List the known families and the plugin providing each."""
    from slmops.plugin.provided import plugin_of, template_families

    rows = [
        {"family": f.name, "plugin": plugin_of(f), "description": f.description, "stop": f.stop}
        for f in template_families()
    ]
    output.emit_json(rows) if as_json else output.table(rows, ["family", "plugin", "description", "stop"])


@templates.command("show")
@click.argument("family")
@json_option
def templates_show(family: str, as_json: bool) -> None:
    """Show a family's PromptTemplate, stop strings and ModelConfig defaults."""
    from slmops.plugin.provided import plugin_of
    from slmops.templates import family_by_name

    f = family_by_name(family)
    data = {
        "family": f.name,
        "plugin": plugin_of(f),
        "bos": f.bos,
        "PromptTemplate": f.prompt_template(),
        "stop": f.stop,
        "ModelConfig": f.model_config,
        "system_in_first_user": f.system_in_first_user,
    }
    if as_json:
        output.emit_json(data)
        return
    rows = [
        {"field": k, "value": repr(v)}
        for k, v in {
            "bos": f.bos,
            **f.prompt_template(),
            "stop": f.stop,
            "system folding": f.system_in_first_user,
            **f.model_config,
        }.items()
    ]
    output.table(rows, ["field", "value"], title=f"{f.name} ({plugin_of(f)})")


@templates.command("render")
@click.argument("family")
@click.option("--system", "system_text", help="System message.")
@click.option("--user", "user_text", required=True, help="User message.")
def templates_render(family: str, system_text: str | None, user_text: str) -> None:
    """Print the exact prompt FAMILY builds for a system and user message."""
    from slmops.templates import family_by_name, render

    messages = ([{"role": "system", "content": system_text}] if system_text else []) + [
        {"role": "user", "content": user_text}
    ]
    sys.stdout.write(render(family_by_name(family), messages))
    sys.stdout.write("\n")


@templates.command("check")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--family", default="auto", show_default=True, help="Family to check, or auto to detect.")
@json_option
def templates_check(model_dir: str, family: str, as_json: bool) -> None:
    """Detect MODEL_DIR's family and compare its template with the tokenizer's own, byte and token."""
    from slmops.templates import choose, fidelity

    chosen = choose(Path(model_dir), family)
    result = fidelity(Path(model_dir), chosen)
    result.update(family=chosen.family.name, how=chosen.how, default_system=chosen.default_system)
    if as_json:
        output.emit_json(result)
    else:
        click.echo(f"family: {chosen.family.name} ({chosen.how}); default system: {chosen.default_system!r}")
        if not result["checked"]:
            click.echo(f"not checked: {result['reason']}")
        output.table(
            result["conversations"], ["conversation", "ok", "tokens", "first_diff_char", "first_diff_token", "skipped"]
        )
    if not result["ok"]:
        raise SlmopsError(
            f"template {chosen.family.name} does not match {model_dir}'s chat template (see the rows marked False)"
        )


registry_option = click.option("--registry", "registry_backend", help="Registry plugin (default: [registry] backend).")


@cli.command("register")
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--name", required=True, help="Name to register under.")
@click.option("--family", default=None, help="Prompt-template family (default: detect).")
@click.option("--version", "version_", default=None, help="Version recorded in inference_model.json.")
@click.option("--description", default=None, help="Description recorded in inference_model.json.")
@click.option(
    "--replace/--no-replace", default=None, help="Replace an existing entry of the same name (default) or refuse."
)
@click.option(
    "--adapter",
    "adapter_specs",
    multiple=True,
    help="NAME=DIR: add this PEFT LoRA as an adapter of the registered base (repeatable; see `slmops adapters`).",
)
@registry_option
@json_option
@pass_state
def register_cmd(
    state: State,
    model_dir: str,
    name: str,
    family: str | None,
    version_: str | None,
    description: str | None,
    replace: bool | None,
    adapter_specs: tuple[str, ...],
    registry_backend: str | None,
    as_json: bool,
) -> None:
    """Place MODEL_DIR in the registry as NAME, with a checked inference_model.json."""
    from slmops import adapter_registry
    from slmops import registry as reg

    extra = [adapter_spec(spec) for spec in adapter_specs]  # a malformed one is refused before anything is written

    cfg = state.config
    cfg.override("model.family", family, "command line")
    cfg.override("registry.version", version_, "command line")
    cfg.override("registry.description", description, "command line")
    cfg.override("registry.replace", replace, "command line")
    registry = reg.open_registry(cfg, registry_backend)
    with reg.package(Path(model_dir), name, cfg, registry.name) as pkg:
        result = reg.add(registry, pkg, cfg.get("registry.replace"))
    result["adapters"] = [adapter_registry.add(registry, name, adapter, folder) for adapter, folder in extra]
    if as_json:
        output.emit_json(result)
    else:
        e = result["entry"]
        output.table(
            [
                {
                    "name": e["name"],
                    "id": e["id"],
                    "family": e["family"],
                    "precision": e["precision"],
                    "size": output.human_bytes(e["size_bytes"]),
                    "path": e["path"],
                }
            ],
            ["name", "id", "family", "precision", "size", "path"],
            title=f"registered with {registry.name}",
        )
        if result["adapters"]:
            adapter_table([{**r, "model": f"{name}:{r['adapter']}"} for r in result["adapters"]], "adapters added")


def adapter_spec(value: str) -> tuple[str, Path]:
    """NAME=DIR (a PEFT LoRA folder), as --adapter and `adapters add` take it."""
    name, sep, folder = value.partition("=")
    if not sep or not name or not folder:
        raise UsageError(f"adapter {value!r}: give NAME=DIR, the name to serve it by and the LoRA folder peft saved")
    return name, Path(folder)


def adapter_table(rows: list[dict[str, Any]], title: str) -> None:
    output.table(rows, ["model", "size_mb", "mean_kld", "top1_agreement", "domain_accuracy"], title=title)


@cli.group()
def adapters() -> None:
    """A registered base's LoRA adapters, served per request as BASE:ADAPTER: add, ls, rm."""


@adapters.command("add")
@click.argument("base")
@click.argument("adapter")
@click.option("--domain", type=click.Path(dir_okay=False, path_type=Path), help="JSONL domain set to score it on.")
@registry_option
@json_option
@pass_state
def adapters_add(
    state: State, base: str, adapter: str, domain: Path | None, registry_backend: str | None, as_json: bool
) -> None:
    """Add ADAPTER (NAME=DIR, a PEFT LoRA) to the registered BASE, measured against its merged source.

    The base is built again with the LoRA kept apart; it must be the registered base byte for byte (an adapter
    made for another model or other modules is refused), and only the adapter file goes into BASE's folder."""
    from slmops import adapter_registry
    from slmops import registry as reg

    name, folder = adapter_spec(adapter)
    row = adapter_registry.add(reg.open_registry(state.config, registry_backend), base, name, folder, domain)
    row["model"] = f"{base}:{name}"
    output.emit_json(row) if as_json else adapter_table([row], f"adapter added to {base}")


@adapters.command("ls")
@click.argument("base")
@registry_option
@json_option
@pass_state
def adapters_ls(state: State, base: str, registry_backend: str | None, as_json: bool) -> None:
    """List BASE's adapters with their fidelity against their merged sources."""
    from slmops import adapter_registry
    from slmops import registry as reg

    rows = adapter_registry.listing(reg.open_registry(state.config, registry_backend), base)
    output.emit_json({"adapters": rows}) if as_json else adapter_table(rows, f"adapters of {base}")


@adapters.command("rm")
@click.argument("base")
@click.argument("name")
@registry_option
@pass_state
def adapters_rm(state: State, base: str, name: str, registry_backend: str | None) -> None:
    """Remove adapter NAME from BASE (requests for BASE:NAME are refused from then on)."""
    from slmops import adapter_registry
    from slmops import registry as reg

    adapter_registry.remove(reg.open_registry(state.config, registry_backend), base, name)
    click.echo(f"removed {base}:{name}")


@cli.group()
def cache() -> None:
    """The registry's model cache: ls, location, cd, rm."""


def entry_rows(entries) -> list[dict[str, Any]]:
    """Registry entries as table rows: sizes in MB, times to the minute (--json keeps the id and the ISO time)."""
    return [
        {**e.__dict__, "size": output.human_bytes(e.size_bytes), "registered": _minute(e.registered_at)}
        for e in entries
    ]


def _minute(iso: str | None) -> str | None:
    """'2026-12-06T06:23:06+00:00' -> '2026-12-06 06:23'."""
    return iso[:16].replace("T", " ") if iso and len(iso) >= 16 and iso[10] == "T" else iso


@cache.command("ls")
@registry_option
@json_option
@pass_state
def cache_ls(state: State, registry_backend: str | None, as_json: bool) -> None:
    """List registered models."""
    from slmops.registry import entries as registry_entries
    from slmops.registry import open_registry

    registry = open_registry(state.config, registry_backend)
    entries = registry_entries(registry)
    if as_json:
        output.emit_json([e.__dict__ for e in entries])
    elif not entries:
        click.echo(f"no models registered in {registry.name} at {registry.root}")
    else:
        output.table(entry_rows(entries), ["name", "status", "family", "precision", "size", "registered", "path"])
        for e in entries:
            if e.status == "missing":
                click.echo(
                    f"{e.name}: its folder {e.path} is missing; `slmops cache rm {e.name}` removes the entry", err=True
                )
            elif e.status == "changed":
                click.echo(
                    f"{e.name}: its files changed after it was validated, so it is not served; deploy or register "
                    "it again",
                    err=True,
                )


@cache.command("location")
@registry_option
@pass_state
def cache_location(state: State, registry_backend: str | None) -> None:
    """Print where the registry keeps models."""
    from slmops.registry import open_registry

    click.echo(open_registry(state.config, registry_backend).root)


@cache.command("cd")
@click.argument("name")
@registry_option
@pass_state
def cache_cd(state: State, name: str, registry_backend: str | None) -> None:
    """Print NAME's folder (use: cd "$(slmops cache cd NAME)")."""
    from slmops.registry import find_runnable, open_registry

    click.echo(find_runnable(open_registry(state.config, registry_backend), name).path)


@cache.command("rm")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask.")
@registry_option
@pass_state
def cache_rm(state: State, name: str, yes: bool, registry_backend: str | None) -> None:
    """Unregister NAME and delete its folder."""
    from slmops.registry import find, open_registry

    registry = open_registry(state.config, registry_backend)
    entry = find(registry, name)
    if not yes:
        try:
            confirmed = click.confirm(f"Remove {entry.name} and delete {entry.path}?", default=False, err=True)
        except click.exceptions.Abort:  # no terminal and nothing on stdin
            confirmed = False
        if not sys.stdin.isatty():  # the answer was not echoed: end the prompt's line
            click.echo("", err=True)
        if not confirmed:
            raise SlmopsError(f"{entry.name} not removed; answer y, or pass --yes")
    registry.remove(entry.name)
    click.echo(f"removed {entry.name}", err=True)


@cli.group()
def builds() -> None:
    """slmops's build cache: ls, rm, prune."""


@builds.command("ls")
@registry_option
@json_option
@pass_state
def builds_ls(state: State, registry_backend: str | None, as_json: bool) -> None:
    """List cached builds: size, age, and which deployments and registered models use each."""
    from slmops.build.builds import builds_dir, list_builds
    from slmops.registry import open_registry

    rows = list_builds(open_registry(state.config, registry_backend))
    if as_json:
        output.emit_json(rows)
    elif not rows:
        click.echo(f"no builds in {builds_dir()}")
    else:
        output.table(
            [
                {**r, "size": output.human_bytes(r["size_bytes"]), "used_by": ", ".join(r["used_by"]) or "-"}
                for r in rows
            ],
            ["build", "precision", "size", "age_days", "used_by"],
            title=f"builds in {builds_dir()}",
        )


@builds.command("rm")
@click.argument("build")
def builds_rm(build: str) -> None:
    """Delete one cached build (registered models keep their own copies)."""
    from slmops.build.builds import remove

    click.echo(f"removed {remove(build)}", err=True)


@builds.command("prune")
@click.option(
    "--older-than",
    type=click.FloatRange(0),
    default=0,
    show_default=True,
    help="Only builds at least this many days old.",
)
@click.option("--dry-run", is_flag=True, help="Show what would be removed.")
@registry_option
@json_option
@pass_state
def builds_prune(state: State, older_than: float, dry_run: bool, registry_backend: str | None, as_json: bool) -> None:
    """Delete the builds no deployment or registered model uses."""
    from slmops.build import builds as b
    from slmops.registry import open_registry

    rows = b.prune(open_registry(state.config, registry_backend), older_than, dry_run)
    if as_json:
        output.emit_json({"dry_run": dry_run, "removed": rows})
        return
    freed = output.human_bytes(sum(r["size_bytes"] for r in rows))
    click.echo(f"{'would remove' if dry_run else 'removed'} {len(rows)} build(s), {freed}", err=True)


@cli.group()
def model() -> None:
    """Run registered models."""


EXIT_WORDS = {"exit", "quit", "/bye", "/exit"}


@model.command("run")
@click.argument("name")
@click.option("--prompt", "-p", help="Answer this once and exit (stdout: only the answer).")
@click.option("--system", "system_text", help="System message.")
@click.option(
    "--engine",
    type=click.Choice(["registry", "ort-genai"]),
    default="registry",
    show_default=True,
    help="Run through the registry's runtime (Foundry Local) or ORT GenAI directly.",
)
@click.option("--adapter", help="LoRA adapter to switch on (default: the model's only one; 'none' for the base).")
@click.option("--max-new-tokens", type=click.IntRange(1, 32768), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(0, 5), help="Override ModelConfig temperature (0: greedy).")
@click.option("--top-p", type=click.FloatRange(0, 1), help="Override ModelConfig top_p.")
@click.option("--repetition-penalty", type=click.FloatRange(0.5, 3), help="Override ModelConfig repetition_penalty.")
@click.option("--max-length", type=click.IntRange(16), help="Override ModelConfig max_length.")
@click.option(
    "--json-schema",
    "schema_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Keep every answer to this JSON schema (constrained decoding; runs with ORT GenAI).",
)
@click.option(
    "--tools",
    "tools_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Functions the model may call (a JSON list in OpenAI's tools form); calls keep to their schemas.",
)
@click.option(
    "--tool-choice",
    default="auto",
    show_default=True,
    help="With --tools: auto, required, none, or a function's name (it must call that one).",
)
@registry_option
@json_option
@pass_state
def model_run(
    state: State,
    name: str,
    prompt: str | None,
    system_text: str | None,
    engine: str,
    registry_backend: str | None,
    as_json: bool,
    adapter: str | None,
    schema_file: Path | None,
    tools_file: Path | None,
    tool_choice: str,
    **overrides: Any,
) -> None:
    """Chat with NAME (BASE:ADAPTER: with that LoRA adapter on): interactive and streaming, or one answer with
    --prompt."""
    from slmops import registry as reg
    from slmops.run import structure
    from slmops.run.chat_session import ChatRunner

    if schema_file is not None:
        overrides["constraint"] = structure.read_schema(schema_file)
    if tools_file is not None:
        if schema_file is not None:
            raise UsageError("--json-schema and --tools cannot be used together; give one of them")
        choice = tool_choice if tool_choice in ("auto", "required", "none") else {"function": {"name": tool_choice}}
        overrides["tools"] = (structure.read_json(tools_file, "tools file"), choice)

    registry = reg.open_registry(state.config, registry_backend)
    if ":" in name and adapter is None and not any(name in (e.name, e.id) for e in registry.list()):
        name, _, adapter = name.partition(":")  # base:adapter, as `slmops serve` names it
    runner = ChatRunner(
        registry,
        name,
        engine,
        {k: v for k, v in overrides.items() if v is not None},
        adapter,
    )
    if prompt is not None:
        result = runner.answer(prompt, system_text, stream_to=None if as_json else sys.stdout)
        if as_json:
            output.emit_json(result)
        else:
            sys.stdout.write("\n")
        return
    from slmops.run.chat_repl import interactive

    interactive(runner, system_text, EXIT_WORDS)


@cli.command()
@click.argument("names", nargs=-1)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback only by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free port).")
@click.option(
    "--engine",
    type=click.Choice(["registry", "ort-genai"]),
    default="registry",
    show_default=True,
    help="Answer through the registry's runtime (Foundry Local: one request at a time per model) or ORT GenAI "
    "directly (--parallel requests at once).",
)
@click.option(
    "--parallel",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Requests one model answers at once (ORT GenAI engine; the registry runtime answers one at a time).",
)
@click.option(
    "--max-queue",
    type=click.IntRange(0, 4096),
    default=16,
    show_default=True,
    help="Requests a model keeps waiting; past that the server answers 429.",
)
@click.option(
    "--api-key", envvar="SLMOPS_API_KEY", help="Require 'Authorization: Bearer KEY' (also from $SLMOPS_API_KEY)."
)
@registry_option
@pass_state
def serve(
    state: State,
    names: tuple[str, ...],
    host: str,
    port: int,
    engine: str,
    parallel: int,
    max_queue: int,
    api_key: str | None,
    registry_backend: str | None,
) -> None:
    """Serve registered models (NAMES, default all) with an OpenAI-compatible API: /v1/models, /v1/chat/completions."""
    from slmops import extras
    from slmops import registry as reg

    extras.need("serve", "slmops serve")
    from slmops.run import serve as srv

    settings = srv.ServeSettings(parallel=parallel, max_queue=max_queue, api_key=api_key or None)
    sock = srv.bind(host, port)  # first: a port in use is said before minutes of loading
    models = srv.open_models(reg.open_registry(state.config, registry_backend), list(names), engine, settings)
    address = sock.getsockname()
    where = f"http://{'[' + address[0] + ']' if ':' in address[0] else address[0]}:{address[1]}/v1"
    output.table(
        [
            {"model": m.name, "engine": m.runner.engine, "parallel": m.parallel, "queue": m.max_queue}
            for m in models.values()
        ],
        ["model", "engine", "parallel", "queue"],
        title="serving",
    )
    if not srv.is_loopback(host) and not settings.api_key:
        click.echo(
            f"warning: listening on {host} without --api-key: anyone who reaches this machine can use the models",
            err=True,
        )
    click.echo(f"OpenAI API at {where} (base_url for the openai client); Ctrl-C stops", err=True)
    srv.run(srv.Server(models, settings), sock)
    click.echo("slmops serve: stopped", err=True)


def bench_settings(
    cfg: Config, runs: int | None, max_new_tokens: int | None, lengths: str | None, soak: int | None
) -> dict[str, Any]:
    cfg.override("bench.runs", runs, "command line")
    cfg.override("bench.max_new_tokens", max_new_tokens, "command line")
    if lengths:
        try:
            cfg.override("bench.lengths", [int(x) for x in lengths.split(",")], "command line")
        except ValueError:
            raise UsageError(
                f"--lengths must be comma-separated whole numbers, e.g. 16,128,512, not {lengths!r}"
            ) from None
    cfg.override("validate.soak_requests", soak, "command line")
    return {**cfg.section("bench"), "soak_requests": cfg.get("validate.soak_requests")}


def bench_flags(f):
    for opt in reversed(
        [
            click.option("--runs", type=click.IntRange(1), help="Measured runs per prompt length."),
            click.option("--max-new-tokens", type=click.IntRange(2), help="Tokens generated per run."),
            click.option("--lengths", help="Prompt lengths of the sweep, e.g. 16,128,512."),
            click.option("--soak", type=click.IntRange(0), help="Requests in the memory soak."),
            click.option(
                "--report", type=click.Path(file_okay=False), help="Write a Markdown report with PNG plots here."
            ),
        ]
    ):
        f = opt(f)
    return f


@cli.command()
@click.argument("target", required=False)
@click.option(
    "--compare",
    "compare_source",
    help="Build fp32/int8/int4 from this SOURCE ('default' for the embedded model) and compare.",
)
@click.option("--quality/--no-quality", default=True, help="Also measure quality against the fp32 reference.")
@click.option("--reference", type=click.Path(file_okay=False), help="fp32 model folder to compare against.")
@click.option("--domain", type=click.Path(dir_okay=False), help="JSONL domain set to score.")
@click.option("--edge-cases/--no-edge-cases", default=True, help="Run the edge-case suite.")
@click.option("--benchmarker", help="Benchmarker plugin.")
@bench_flags
@json_option
@pass_state
def bench(
    state: State,
    target: str | None,
    compare_source: str | None,
    quality: bool,
    reference: str | None,
    domain: str | None,
    edge_cases: bool,
    benchmarker: str | None,
    runs,
    max_new_tokens,
    lengths,
    soak,
    report,
    as_json: bool,
) -> None:
    """Measure TARGET (a registered name or a model folder): speed, memory, CPU, quality, edge cases."""
    from slmops import tables
    from slmops.measure import bench as b
    from slmops.measure.report import write_report

    cfg = state.config
    settings = bench_settings(cfg, runs, max_new_tokens, lengths, soak)
    if compare_source:
        result = b.compare_precisions(compare_source, cfg.convert_options(), settings, cfg.section("validate"))
        if report:
            result["report"] = str(write_report(Path(report), compare=result))
        if as_json:
            output.emit_json(result)
            return
        tables.compare(result)
        for skipped in result["skipped"]:
            click.echo(f"not built: {skipped['build']}: {skipped['why']}")
        click.echo(f"recommendation: {result['recommendation']}: {result['why']}")
        if report:
            click.echo(f"report: {result['report']}")
        return
    if not target:
        raise SlmopsError("give a TARGET (registered name or model folder), or --compare SOURCE")
    result = b.bench(
        b.resolve_target(cfg, target),
        settings,
        benchmarker,
        quality,
        reference,
        Path(domain) if domain else None,
        edge_cases,
    )
    data = b.bench_json(result)
    if report:
        data["report"] = str(write_report(Path(report), bench=result["bench"]))
    if as_json:
        output.emit_json(data)
        return
    tables.bench(result)
    if report:
        click.echo(f"report: {data['report']}")


@cli.command("validate")
@click.argument("target")
@click.option("--max-kld", type=float, help="Highest mean KLD accepted.")
@click.option("--min-top1", type=float, help="Lowest top-1 agreement accepted.")
@click.option("--reference", type=click.Path(file_okay=False), help="fp32 model folder to compare against.")
@click.option("--domain", type=click.Path(dir_okay=False), help="JSONL domain set to score.")
@click.option("--benchmarker", help="Benchmarker plugin (default: the first that can measure the model).")
@bench_flags
@json_option
@pass_state
def validate_cmd(
    state: State,
    target: str,
    max_kld: float | None,
    min_top1: float | None,
    reference: str | None,
    domain: str | None,
    benchmarker: str | None,
    runs,
    max_new_tokens,
    lengths,
    soak,
    report,
    as_json: bool,
) -> None:
    """The guide's quality checklist as pass/fail; exit 1 when a check fails."""
    from slmops import tables
    from slmops.measure import bench as b
    from slmops.measure.gate import validate
    from slmops.measure.report import write_report

    cfg = state.config
    cfg.override("validate.max_kld", max_kld, "command line")
    cfg.override("validate.min_top1", min_top1, "command line")
    bench_settings(cfg, runs, max_new_tokens, lengths, soak)
    model_dir = b.resolve_target(cfg, target)
    result = validate(model_dir, cfg, reference, Path(domain) if domain else None, benchmarker=benchmarker)
    data = result.to_json()
    if report:
        data["report"] = str(write_report(Path(report), bench=result.bench))
    if as_json:
        output.emit_json(data)
    else:
        tables.validation(result)
    if not result.ok:
        raise SlmopsError("validation failed: " + ", ".join(c.check for c in result.failed))


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--jobs", "jobs_at_once", type=int, help="Jobs at once (default: half the CPUs, within memory).")
@click.option("--markdown", type=click.Path(dir_okay=False), help="Also write the report as Markdown here.")
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Where jobs run: this machine's pool, or a Ray cluster's nodes (slmops[ray]).",
)
@click.option("--ray-address", help="The Ray cluster (HOST:PORT; default: $RAY_ADDRESS).")
@json_option
def batch(
    manifest: str,
    jobs_at_once: int | None,
    markdown: str | None,
    executor: str,
    ray_address: str | None,
    as_json: bool,
) -> None:
    """Run MANIFEST's models x adapters x precisions through deploy's pipeline; one ranked report.

    Jobs run side by side, each in its own process, here or on a Ray cluster (the same report); a failed job does
    not stop the others, and a job done before is not done again. Exit status 1 when a job failed."""
    from slmops import batch as b
    from slmops.host.fsutil import write_text_atomic

    rows = b.run(b.read_manifest(Path(manifest)), jobs_at_once, executor, ray_address)
    if markdown:
        write_text_atomic(Path(markdown), b.markdown(rows))
    if as_json:
        output.emit_json({"jobs": rows})
    else:
        output.table(
            [{**r, "job": b.job_name(r), "#": n} for n, r in enumerate(rows, 1)],
            ["#", "job", "status", "size_mb", "mean_kld", "top1", "domain_accuracy", "decode_tok_s"],
            title="batch: ranked (passed first, then the smallest)",
        )
        for r in rows:
            if r["status"] == "failed":
                click.echo(f"{b.job_name(r)} failed: {r['why']}", err=True)
    if any(r["status"] == "failed" for r in rows):
        raise SystemExit(1)


@cli.command()
@click.option("--source", help="HF checkpoint folder, GGUF file, or 'default'.")
@click.option("--name", help="Name to register under.")
@click.option("--family", help="Prompt-template family (default: detect).")
@convert_options(auto=True)
@click.option("--max-kld", type=float, help="Quality gate: highest mean KLD.")
@click.option("--min-top1", type=float, help="Quality gate: lowest top-1 agreement.")
@click.option(
    "--domain", type=click.Path(dir_okay=False), help="Quality gate: JSONL domain set scored against the source."
)
@click.option("--registry-dir", type=click.Path(file_okay=False), help="Registry location.")
@click.option("--ask", help="Ask the deployed model this question.")
@click.option("--dry-run", is_flag=True, help="Print the plan and do nothing.")
@json_option
@pass_state
def deploy(
    state: State, source, name, family, max_kld, min_top1, domain, registry_dir, ask, dry_run, as_json, **flags: Any
) -> None:
    """Run the whole guide from slmops.toml: convert, template, register, validate, ask, benchmark."""
    from slmops import deploy as d
    from slmops import tables

    cfg = state.config
    for key, value in (
        ("model.source", source),
        ("model.name", name),
        ("model.family", family),
        ("validate.max_kld", max_kld),
        ("validate.min_top1", min_top1),
        ("validate.domain", domain),
        ("registry.cache_dir", registry_dir),
    ):
        cfg.override(key, value, "command line")
    apply_convert_flags(cfg, flags)
    if dry_run:
        steps = d.plan(cfg)
        output.emit_json({"dry_run": True, "plan": steps}) if as_json else click.echo("\n".join(steps))
        return
    result = d.deploy(cfg, ask)
    if as_json:
        output.emit_json(result.to_json())
        return
    tables.deployment(result)
    if result.answer:
        click.echo(f"Q: {ask}\nA: {result.answer['answer'].strip()}")
    click.echo(f"Chat with it: {result.run}\nServe it (OpenAI API at http://127.0.0.1:8000/v1): {result.serve}")
