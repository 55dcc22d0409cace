"""Hook specs, plugin manager, config, CLI errors, doctor, and the embedded default model."""

import json
import os
import time
from pathlib import Path

import pytest

from slmops import extras
from slmops.plugin import hookspecs


def test_every_hook_documents_its_arguments():
    hooks = [n for n in dir(hookspecs) if n.startswith("register_")]
    assert {
        "register_converters",
        "register_quantizers",
        "register_template_families",
        "register_registries",
        "register_benchmarkers",
        "register_commands",
    } <= set(hooks)
    for name in hooks:
        doc = getattr(hookspecs, name).__doc__
        assert doc and ":param" in doc, name


def test_hook_hands_register_callback_and_core_keeps_the_list():
    from slmops.api import Benchmarker
    from slmops.plugin import provided
    from slmops.plugin.plugin_manager import plugin_manager

    class Plugin:
        @hookspecs.hookimpl
        def register_benchmarkers(self, register):
            class A(Benchmarker):
                name = "bench-a"

            class B(Benchmarker):
                name = "bench-b"

            register(A())
            register(B())

    plugin_manager().register(Plugin(), name="throwaway")
    provided.clear_caches()
    try:
        names = [b.name for b in provided.benchmarkers()]
        assert names == ["ort-genai", "bench-a", "bench-b"]  # built-ins first, then in registration order
        assert {provided.plugin_of(b) for b in provided.benchmarkers()[1:]} == {"throwaway"}
        assert not hasattr(provided.benchmarkers()[1], "plugin")  # the core keeps the record, not the object
    finally:
        plugin_manager().unregister(name="throwaway")
        provided.clear_caches()


def test_plugins_lists_builtins_and_entry_point_plugin(cli):
    r = cli("plugins", "--json")
    assert r.rc == 0, r
    rows = {p["name"]: p for p in r.json()["plugins"]}
    assert rows["slmops.plugins.model_builder"]["hooks"] == ["register_converters"]
    third = rows["thirdparty"]
    assert third["package"] == "slmops-thirdparty" and third["version"] == "0.3.0"
    assert "register_template_families" in third["hooks"]
    assert cli("hello-thirdparty").out.strip() == "hello from slmops-thirdparty"


def test_env_var_limits_plugins(cli):
    r = cli("plugins", "--json", env={"SLMOPS_LOAD_PLUGINS": ""})
    names = {p["name"] for p in r.json()["plugins"]}
    assert "thirdparty" not in names and "slmops.plugins.olive" in names
    r = cli("plugins", "--json", env={"SLMOPS_DISABLE_PLUGINS": "olive"})
    assert "slmops.plugins.olive" not in {p["name"] for p in r.json()["plugins"]}


def test_broken_plugin_is_one_line_and_does_not_break_other_commands(cli, tmp_path):
    # An installed distribution whose entry point module raises on import.
    dist = tmp_path / "broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[slmops]\nbroken = broken_plugin_mod\n")
    (tmp_path / "broken_plugin_mod.py").write_text("raise ImportError('needs a library that is missing')\n")
    env = {"PYTHONPATH": str(tmp_path)}
    r = cli("templates", "ls", "--json", env=env)
    assert r.rc == 0, r
    assert "chatml" in {f["family"] for f in r.json()}
    warnings = [line for line in r.err.splitlines() if "broken" in line]
    assert len(warnings) == 1 and "needs a library that is missing" in warnings[0]
    assert "Traceback" not in r.err
    r = cli("plugins", "--json", env=env)
    assert r.json()["errors"][0]["name"] == "broken"


def _plugin_dist(tmp_path, dist_name: str, entry: str, source: str) -> dict[str, str]:
    """An installed distribution (dist-info + module on PYTHONPATH) whose slmops entry point is ``entry``."""
    module = entry + "_mod"
    dist = tmp_path / f"{dist_name.replace('-', '_')}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[slmops]\n{entry} = {module}\n")
    (tmp_path / f"{module}.py").write_text(source)
    return {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def test_plugin_raising_in_hook_is_disabled_with_one_warning(cli, tmp_path):
    env = _plugin_dist(
        tmp_path,
        "raising-plugin",
        "raising",
        (
            "from slmops.api import TemplateFamily, hookimpl\n"
            "@hookimpl\ndef register_template_families(register):\n"
            "    register(TemplateFamily('half', 'registered before the raise', '', '', '', ''))\n"
            "    raise ValueError('boom')\n"
        ),
    )
    r = cli("templates", "ls", "--json", env=env)
    assert r.rc == 0, r
    families = {f["family"] for f in r.json()}
    assert "chatml" in families and "half" not in families  # the rest works; nothing of the raising plugin is used
    warnings = [line for line in r.err.splitlines() if "raising" in line]
    assert len(warnings) == 1 and "register_template_families" in warnings[0] and "boom" in warnings[0], r
    assert "Traceback" not in r.err
    errors = cli("plugins", "--json", env=env).json()["errors"]
    assert [(e["name"], e["package"], e["hook"]) for e in errors] == [
        ("raising", "raising-plugin", "register_template_families")
    ]


def test_plugin_raising_in_register_commands_does_not_break_help(cli, tmp_path):
    env = _plugin_dist(
        tmp_path,
        "bad-commands",
        "badcommands",
        (
            "from slmops.api import hookimpl\n@hookimpl\ndef register_commands(cli):\n    raise RuntimeError('no commands today')\n"
        ),
    )
    r = cli("--help", env=env)
    assert r.rc == 0 and "deploy" in r.out, r
    assert "badcommands" in r.err and "register_commands" in r.err and "Traceback" not in r.err


def test_two_implementations_with_one_name_warn_naming_both(cli, tmp_path):
    # A third party's chatml must not silently take over detection of the default model.
    env = _plugin_dist(
        tmp_path,
        "chatml-clone",
        "chatmlclone",
        (
            "from slmops.api import TemplateFamily, hookimpl\n"
            "@hookimpl\ndef register_template_families(register):\n"
            "    register(TemplateFamily('chatml', 'an impostor', 'S{Content}', 'U{Content}', 'A{Content}', 'P{Content}'))\n"
        ),
    )
    r = cli("templates", "show", "chatml", "--json", env=env)
    assert r.rc == 0, r
    assert r.json()["plugin"] == "slmops.plugins.templates" and r.json()["PromptTemplate"]["user"] != "U{Content}"
    warning = [line for line in r.err.splitlines() if "named 'chatml'" in line]
    assert len(warning) == 1 and "slmops.plugins.templates" in warning[0] and "chatmlclone" in warning[0], r
    r = cli("templates", "show", "chatml", "--json", env={**env, "SLMOPS_DISABLE_PLUGINS": "templates"})
    assert r.json()["plugin"] == "chatmlclone"


def test_load_and_disable_by_distribution_name_and_unknown_names_warn(cli):
    r = cli("plugins", "--json", env={"SLMOPS_LOAD_PLUGINS": "slmops-thirdparty"})
    assert "thirdparty" in {p["name"] for p in r.json()["plugins"]}, r
    r = cli("plugins", "--json", env={"SLMOPS_DISABLE_PLUGINS": "slmops_thirdparty,nosuch"})
    assert "thirdparty" not in {p["name"] for p in r.json()["plugins"]}
    assert "SLMOPS_DISABLE_PLUGINS names 'nosuch', which is no installed plugin" in r.err, r
    assert "slmops_thirdparty" not in r.err  # a distribution name is known, spelled either way


def test_plugins_shows_which_plugin_provides_each_implementation(cli_here):
    rows = cli_here("plugins", "--json").json()["implementations"]
    by = {(r["role"], r["name"]): r for r in rows}
    assert by[("template family", "zephyrish")]["plugin"] == "thirdparty"
    assert by[("template family", "zephyrish")]["package"] == "slmops-thirdparty"
    assert by[("quantizer", "gguf-native")]["plugin"] == "slmops.plugins.gguf_native"
    assert by[("registry", "foundry-local")]["package"] == "slmops"


def test_config_found_walking_up_and_flags_override(cli_here, tmp_path):
    (tmp_path / "slmops.toml").write_text('[convert]\nprecision = "int8"\nblock_size = 64\n')
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    rows = {r["key"]: r for r in cli_here("config", "--json", cwd=sub).json()["settings"]}
    assert rows["convert.precision"]["value"] == "int8"
    assert rows["convert.precision"]["from"] == f"{tmp_path / 'slmops.toml'}:2"
    assert rows["convert.block_size"]["value"] == 64
    assert rows["convert.symmetric"]["from"] == "default"
    other = tmp_path / "other.toml"
    other.write_text('[model]\nname = "x1"\n')
    rows = {r["key"]: r for r in cli_here("--config", other, "config", "--json", cwd=sub).json()["settings"]}
    assert rows["model.name"]["value"] == "x1" and rows["convert.precision"]["value"] == "int4"


def test_plugin_options_come_from_the_file_and_the_flag_as_typed_values(cli_here, tmp_path):
    from slmops.config import load_config
    from slmops.plugin.roles import ConvertRequest

    path = tmp_path / "slmops.toml"
    path.write_text('[plugins.gptq]\nlearned_scales = 40\n\n[plugins.other]\nmode = "fast"\n')
    rows = {r["key"]: r for r in cli_here("config", "--json", cwd=tmp_path).json()["settings"]}
    assert rows["plugins.gptq.learned_scales"]["value"] == 40
    assert rows["plugins.gptq.learned_scales"]["from"] == f"{path}:2"
    cfg = load_config(path)
    cfg.set_plugin_option("gptq.learned_scales_rate=1e-4", "command line")
    cfg.set_plugin_option("other.mode = slow words", "command line")  # not TOML: kept as text
    options = cfg.convert_options()["plugin_options"]
    assert options == {"gptq": {"learned_scales": 40, "learned_scales_rate": 1e-4}, "other": {"mode": "slow words"}}
    # a request without plugin options has the options (so the cache key) of a build made before they existed
    assert "plugin_options" not in ConvertRequest(source_dir=tmp_path).options()
    assert ConvertRequest(source_dir=tmp_path, plugin_options=options).options()["plugin_options"] == options


def test_a_candidate_keeps_the_plugin_options_the_user_gave():
    # deploy --precision auto and bench --compare lay each candidate's options over the user's: a candidate's own
    # plugin option (gptq's Q5_K_M budget) is added, one the user gave wins, the user's other options stay.
    from slmops.build import candidates

    candidate = dict(candidates.CANDIDATES)["int4 gptq, Q5_K_M bytes"]
    user = {"precision": "auto", "plugin_options": {"gptq": {"learned_scales": 40}, "other": {"mode": "x"}}}
    merged = candidates.candidate_options(user, candidate)
    assert merged["precision"] == "int4" and merged["algorithm"] == "gptq"
    assert merged["plugin_options"] == {"gptq": {"budget": "Q5_K_M", "learned_scales": 40}, "other": {"mode": "x"}}
    mine = {"plugin_options": {"gptq": {"budget": "Q4_K_M"}}}
    assert candidates.candidate_options(mine, candidate)["plugin_options"]["gptq"]["budget"] == "Q4_K_M"
    assert "plugin_options" not in candidates.candidate_options({}, dict(candidates.CANDIDATES)["int4 gptq"])
    assert candidate["plugin_options"] == {"gptq": {"budget": "Q5_K_M"}}  # the list itself is not changed


@pytest.mark.parametrize(
    "text, expected",
    [
        ('[convert]\nprecision = "int4\n', "invalid TOML"),
        ("[convert]\nblok_size = 32\n", "unknown key convert.blok_size"),
        ('[convert]\n\nblock_size = "big"\n', "convert.block_size must be int"),
        ("[nosuch]\nx = 1\n", "unknown section [nosuch]"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(cli_here, tmp_path, text, expected):
    path = tmp_path / "slmops.toml"
    path.write_text(text)
    r = cli_here("--config", path, "config")
    assert r.rc == 2  # a usage error, as a bad flag is
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in r.err
    if "blok" in expected:
        assert f"{path}:2" in lines[0]
    if "must be int" in expected:
        assert f"{path}:3" in lines[0]


def test_missing_config_unknown_command_and_option(cli_here, tmp_path):
    for args, text in [
        (("--config", tmp_path / "nope.toml", "config"), "not found"),
        (("frobnicate",), "No such command"),
        (("convert", "--colour", "red"), "No such option"),
    ]:
        r = cli_here(*args)
        assert r.rc != 0
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and text in lines[0], r


def test_doctor_reports_the_stack(cli):
    r = cli("doctor", "--json")
    rows = {row["check"]: row for row in r.json()}
    assert rows["onnxruntime-genai"]["status"] == "ok"
    assert rows["ORT GenAI runtime"]["status"] == "ok"
    foundry = rows["registry foundry-local"]  # asked through the registry role, not by import
    if extras.missing("foundry"):  # the suite with only the core installed (make wheel-check)
        assert foundry["status"] == "warn" and "slmops[foundry]" in foundry["detail"], foundry
    else:
        assert foundry["status"] == "ok", foundry
    assert "GB" in rows["free RAM"]["detail"]
    assert r.rc == 0, r


def test_default_model_is_converted_once_and_reused(default_checkpoint):
    from slmops.build import sources

    config = json.loads((default_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (default_checkpoint / "model.safetensors").stat().st_size > 400e6  # dequantized to float32
    mtime = (default_checkpoint / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    again = sources.resolve(None)
    assert again.checkpoint == default_checkpoint
    assert (default_checkpoint / "model.safetensors").stat().st_mtime_ns == mtime
    assert time.perf_counter() - start < 5  # a stat-memoized hash, no conversion


def test_unreadable_gguf_is_a_clear_error(cli, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(256))
    r = cli("convert", bad)
    assert r.rc == 1
    assert r.err.strip().splitlines()[-1].startswith("slmops: error: cannot read GGUF")
    assert "Traceback" not in r.err


def test_generated_docs_are_current():
    import importlib.util

    docs = Path(__file__).resolve().parents[1] / "docs"
    spec = importlib.util.spec_from_file_location("gen_docs", docs / "gen_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (docs / "hooks.md").read_text() == gen.hooks_page(), "docs/hooks.md is stale: run `make docs`"
    assert (docs / "cli.md").read_text() == gen.cli_page(), "docs/cli.md is stale: run `make docs`"
    assert "## `slmops deploy`" in gen.cli_page() and "## `slmops install`" in gen.cli_page()


def test_stop_text_cuts_stop_strings_split_over_pieces():
    from slmops.run.chat import StopText

    def run(pieces, stops):
        text = StopText(stops)
        out = [text.push(p) for p in pieces]
        return "".join(out) + ("" if text.stopped else text.flush()), text.stopped, out

    assert run(["Hello <|im", "_end|> more"], ["<|im_end|>"])[:2] == ("Hello ", True)
    assert run(["1, 2, 3", ", 4"], ["3, 4"])[:2] == ("1, 2, ", True)
    whole, stopped, out = run(["a <", "b> c"], ["<|im_end|>"])
    assert (whole, stopped) == ("a <b> c", False) and out[0] == "a "  # "<" held back until it cannot be a stop
    assert run(["no stops here"], [])[:2] == ("no stops here", False)


def test_plugin_commands_are_there_however_the_group_is_invoked(cli_here):
    """The group adds plugins' commands itself when first asked for one, so click's own CliRunner, which knows
    nothing of main(), finds them too."""
    from click.testing import CliRunner

    from slmops.cli import cli as group

    done = CliRunner().invoke(group, ["hello-thirdparty"])
    assert done.exit_code == 0 and done.output == "hello from slmops-thirdparty\n", done.output
    assert "hello-thirdparty" in cli_here("--help").out


def test_a_long_step_shows_how_far_it_has_got(monkeypatch):
    """Scoring a build against its source runs minutes: its step's line counts the windows scored."""
    import io

    import numpy as np
    from rich.console import Console

    from slmops import progress
    from slmops.measure import quality

    monkeypatch.setattr(progress, "console", Console(file=io.StringIO(), force_terminal=True))
    monkeypatch.setattr(progress, "quiet", False)
    shown = []
    real_count = progress.count

    def watch(done: int, total: int, what: str) -> None:
        real_count(done, total, what)
        shown.append(progress._running[-1][1].status)

    monkeypatch.setattr(progress, "count", watch)
    rng = np.random.default_rng(0)
    logits = lambda tokens: rng.standard_normal((len(tokens), 16)).astype(np.float32)  # noqa: E731
    rows = [{"text": "x" * 300}, {"text": "y" * 100}]
    with progress.step("Measuring int4 against fp32"):
        quality.score(logits, {"int4": logits}, lambda text: [ord(c) % 16 for c in text], rows, chunk=64)
    assert shown == [f"Measuring int4 against fp32... {i}/7 windows scored" for i in range(7)]
    assert not progress._running


def test_a_table_fits_80_columns_and_cuts_no_name(monkeypatch):
    """A long model name or path wraps inside its cell (rich cut it to 'smollm2-1…' before)."""
    import io
    import re

    from rich.console import Console

    from slmops import output

    monkeypatch.setattr(output, "stdout", Console(file=io.StringIO(), width=80, highlight=False, soft_wrap=False))
    name = "smollm2-135m-instruct-int4-gptq-calibrated-on-orders"
    path = f"/root/.foundry/cache/models/custom/{name}"
    output.table(
        [{"name": name, "family": "chatml", "size": "105.5 MB", "path": path}], ["name", "family", "size", "path"]
    )
    text = output.stdout.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    columns = [re.split(r"[│┃]", line)[1:-1] for line in text.splitlines() if line.startswith("│")]
    cells = ["".join(row[i].strip() for row in columns) for i in range(4)]
    assert cells == [name, "chatml", "105.5 MB", path]

    # A name of up to 40 characters stays on one line, the other columns narrowing around it (cache ls's 7 columns)
    monkeypatch.setattr(output, "stdout", Console(file=io.StringIO(), width=80, highlight=False, soft_wrap=False))
    short = "smollm2-135m-instruct-orders"
    keys = ["name", "status", "family", "precision", "size", "registered", "path"]
    values = [short, "ok", "chatml", "int4", "105.5 MB", "2026-12-06 06:23", path]
    output.table([dict(zip(keys, values, strict=True))], keys)
    text = output.stdout.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80 and any(
        f"│ {short} │" in line for line in text.splitlines()
    )
