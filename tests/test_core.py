"""Hook specs, plugin manager, config, CLI errors, doctor, and the embedded default model."""

import json
import os
import time
from pathlib import Path

import pytest

from slmops import hookspecs


def test_every_hook_documents_its_arguments():
    hooks = [n for n in dir(hookspecs) if n.startswith("register_")]
    assert {"register_converters", "register_quantizers", "register_template_families", "register_registries",
            "register_benchmarkers", "register_commands"} <= set(hooks)
    for name in hooks:
        doc = getattr(hookspecs, name).__doc__
        assert doc and ":param" in doc, name


def test_hook_hands_register_callback_and_core_keeps_the_list():
    from slmops import implementations
    from slmops.plugin_manager import pm

    class Plugin:
        @hookspecs.hookimpl
        def register_benchmarkers(self, register):
            from slmops.roles import Benchmarker

            class A(Benchmarker):
                name = "bench-a"

            class B(Benchmarker):
                name = "bench-b"

            register(A())
            register(B())

    pm.register(Plugin(), name="throwaway")
    implementations.clear_caches()
    try:
        names = [b.name for b in implementations.benchmarkers()]
        assert "bench-a" in names and "bench-b" in names and "ort-genai" in names
        assert {b.plugin for b in implementations.benchmarkers() if b.name.startswith("bench-")} == {"throwaway"}
    finally:
        pm.unregister(name="throwaway")
        implementations.clear_caches()


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


def test_plugin_raising_in_hook_is_one_line(cli, tmp_path):
    dist = tmp_path / "raising_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: raising-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[slmops]\nraising = raising_plugin_mod\n")
    (tmp_path / "raising_plugin_mod.py").write_text(
        "from slmops import hookimpl\n@hookimpl\ndef register_template_families(register):\n    raise ValueError('boom')\n")
    r = cli("templates", "ls", env={"PYTHONPATH": str(tmp_path)})
    assert r.rc == 1
    assert r.err.strip().splitlines()[-1].startswith("slmops: error: plugin 'raising' failed in register_template_families")
    assert "Traceback" not in r.err


def test_config_found_walking_up_and_flags_override(cli, tmp_path):
    (tmp_path / "slmops.toml").write_text('[convert]\nprecision = "int8"\nblock_size = 64\n')
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    rows = {r["key"]: r for r in cli("config", "--json", cwd=sub).json()["settings"]}
    assert rows["convert.precision"]["value"] == "int8"
    assert rows["convert.precision"]["from"] == f"{tmp_path / 'slmops.toml'}:2"
    assert rows["convert.block_size"]["value"] == 64
    assert rows["convert.symmetric"]["from"] == "default"
    other = tmp_path / "other.toml"
    other.write_text('[model]\nname = "x1"\n')
    rows = {r["key"]: r for r in cli("--config", other, "config", "--json", cwd=sub).json()["settings"]}
    assert rows["model.name"]["value"] == "x1" and rows["convert.precision"]["value"] == "int4"


@pytest.mark.parametrize("text, expected", [
    ('[convert]\nprecision = "int4\n', "invalid TOML"),
    ('[convert]\nblok_size = 32\n', "unknown key convert.blok_size"),
    ('[convert]\n\nblock_size = "big"\n', "convert.block_size must be int"),
    ('[nosuch]\nx = 1\n', "unknown section [nosuch]"),
])
def test_bad_config_is_one_line_naming_the_key(cli, tmp_path, text, expected):
    path = tmp_path / "slmops.toml"
    path.write_text(text)
    r = cli("--config", path, "config")
    assert r.rc == 2  # a usage error, as a bad flag is
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in r.err
    if "blok" in expected:
        assert f"{path}:2" in lines[0]
    if "must be int" in expected:
        assert f"{path}:3" in lines[0]


def test_missing_config_unknown_command_and_option(cli, tmp_path):
    for args, text in [(("--config", tmp_path / "nope.toml", "config"), "not found"),
                       (("frobnicate",), "No such command"),
                       (("convert", "--colour", "red"), "No such option")]:
        r = cli(*args)
        assert r.rc != 0
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and text in lines[0], r


def test_doctor_reports_the_stack(cli):
    r = cli("doctor", "--json")
    rows = {row["check"]: row for row in r.json()}
    assert rows["onnxruntime-genai"]["status"] == "ok"
    assert rows["ORT GenAI runtime"]["status"] == "ok"
    assert rows["Foundry Local runtime"]["status"] == "ok"
    assert "GB" in rows["free RAM"]["detail"]
    assert r.rc == 0, r


def test_default_model_is_converted_once_and_reused(default_checkpoint):
    from slmops import sources

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
    assert (docs / "hooks.md").read_text() == gen.hooks_page(), "run `make docs`"
    assert "## `slmops deploy`" in (docs / "cli.md").read_text()


def test_stop_text_cuts_stop_strings_split_over_pieces():
    from slmops.chat import StopText

    def run(pieces, stops):
        text = StopText(stops)
        out = [text.push(p) for p in pieces]
        return "".join(out) + ("" if text.stopped else text.flush()), text.stopped, out

    assert run(["Hello <|im", "_end|> more"], ["<|im_end|>"])[:2] == ("Hello ", True)
    assert run(["1, 2, 3", ", 4"], ["3, 4"])[:2] == ("1, 2, ", True)
    whole, stopped, out = run(["a <", "b> c"], ["<|im_end|>"])
    assert (whole, stopped) == ("a <b> c", False) and out[0] == "a "  # "<" held back until it cannot be a stop
    assert run(["no stops here"], [])[:2] == ("no stops here", False)
