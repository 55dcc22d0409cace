"""The project's list of bad inputs: each one gets a single line on stderr ("slmops: error: ..."), the expected exit
code (2: a value that can never work, refused before any work; 1: a problem with what is on disk), no traceback, and
nothing registered or written.

Placeholders: {tiny} a checkpoint, {int4} an int4 build, {tmp} a scratch folder, {toml:...} an slmops.toml holding
the text after the colon; the other {names} are the broken inputs made in `inputs`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

BAD_INPUTS: list[tuple[str, list[str], int, str]] = [
    # the source
    ("missing source", ["convert", "/no/such/model"], 1, "does not exist"),
    ("folder without config.json", ["convert", "{empty}"], 1, "not a Hugging Face checkpoint"),
    ("checkpoint without tokenizer", ["convert", "{no_tokenizer}"], 1, "has no tokenizer"),
    ("truncated weights", ["convert", "{truncated}"], 1, "is truncated or damaged"),
    ("eos_token_id null", ["convert", "{no_eos}"], 1, "has no eos_token_id"),
    ("adapter without weights", ["convert", "{tiny}", "--adapter", "{bare_adapter}"], 1, "has no adapter weights"),
    ("Method-2 JSON with wrong types", ["convert", "--config", "{bad_method2}"], 1, "must be a JSON object"),
    ("fp16 on the CPU", ["convert", "{tiny}", "--precision", "fp16"], 1, "fp16 models built for the CPU fail"),
    ("block size not offered", ["convert", "{tiny}", "--block-size", "48"], 2, "Invalid value for '--block-size'"),
    ("unknown backend", ["convert", "{tiny}", "--backend", "nosuch"], 1, "no converter named 'nosuch'"),
    # a plugin's own options (--option, [plugins.NAME]): checked by its Options before any work
    (
        "unknown plugin option",
        ["convert", "{tiny}", "--option", "gptq.nosuch=1"],
        1,
        "option gptq.nosuch: Extra inputs are not permitted (options of gptq: learned_scales",
    ),
    (
        "plugin option of the wrong type",
        ["convert", "{tiny}", "--option", "gptq.learned_scales=lots"],
        1,
        "option gptq.learned_scales: Input should be a valid integer",
    ),
    (
        "hostile plugin option",
        ["convert", "{tiny}", "--option", "gptq.learned_scales=99999999"],
        1,
        "option gptq.learned_scales: Input should be less than or equal to 5000",
    ),
    (
        "options for no plugin",
        ["convert", "{tiny}", "--option", "nosuch.x=1"],
        1,
        "options for 'nosuch', which is no loaded converter or quantizer",
    ),
    ("option without its plugin", ["convert", "{tiny}", "--option", "learned_scales=3"], 2, "write PLUGIN.KEY=VALUE"),
    (
        "toml plugin options not a table",
        ["--config", "{toml:[plugins]\ngptq = 3}", "convert", "{tiny}"],
        2,
        "plugins.gptq must be a table",
    ),
    (
        "output under a file",
        ["convert", "{tiny}", "-o", "{a_file}/out"],
        1,
        "check that the folder exists, is writable",
    ),
    # gate values: usage errors before any work
    ("negative max KLD", ["validate", "{int4}", "--max-kld", "-1"], 2, "validate.max_kld = -1.0 is impossible"),
    ("top-1 above 1", ["validate", "{int4}", "--min-top1", "2"], 2, "validate.min_top1 = 2.0 is impossible"),
    ("NaN max KLD", ["validate", "{int4}", "--max-kld", "nan"], 2, "is impossible"),
    ("infinite max KLD", ["deploy", "--max-kld", "inf", "--registry-dir", "{tmp}/reg"], 2, "is impossible"),
    # bench settings from flags and from slmops.toml get the same checks
    ("zero length", ["bench", "{int4}", "--lengths", "0"], 2, "bench.lengths = [0] is impossible"),
    (
        "length not a number",
        ["bench", "{int4}", "--lengths", "a"],
        2,
        "--lengths must be comma-separated whole numbers",
    ),
    (
        "toml max_new_tokens 0",
        ["--config", "{toml:[bench]\nmax_new_tokens = 0}", "bench", "{int4}"],
        2,
        "bench.max_new_tokens = 0 is impossible",
    ),
    ("toml runs 0", ["--config", "{toml:[bench]\nruns = 0}", "bench", "{int4}"], 2, "bench.runs = 0 is impossible"),
    (
        "toml lengths of text",
        ["--config", '{toml:[bench]\nlengths = ["a"]}', "bench", "{int4}"],
        2,
        "bench.lengths = ['a'] is impossible",
    ),
    (
        "toml min_top1 2",
        ["--config", "{toml:[validate]\nmin_top1 = 2}", "deploy"],
        2,
        "validate.min_top1 = 2.0 is impossible",
    ),
    # names and the registry
    ("name with a trailing newline", ["register", "{int4}", "--name", "ok\n"], 1, "invalid model name"),
    ("unknown model", ["model", "run", "nosuch", "--prompt", "hi"], 1, "no model named 'nosuch'"),
    ("rm without --yes and no terminal", ["cache", "rm", "here"], 1, "here not removed; answer y, or pass --yes"),
    ("empty prompt", ["model", "run", "here", "--prompt", "  "], 1, "the prompt is empty"),
    ("prompt longer than the context", ["model", "run", "here", "--prompt", "{long}"], 1, "shorten the prompt"),
    ("cd of an unknown model", ["cache", "cd", "nosuch"], 1, "no model named 'nosuch'"),
    # serve
    ("serve an unknown model", ["serve", "nosuch", "--port", "0"], 1, "no model named 'nosuch'"),
    ("serve on a port out of range", ["serve", "--port", "70000"], 2, "Invalid value for '--port'"),
    ("serve on an unknown host", ["serve", "--host", "no.such.host.invalid", "--port", "0"], 1, "cannot listen on"),
]


@pytest.fixture(scope="module")
def inputs(tiny_llama, tiny_llama_int4, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad")
    made = {"tiny": str(tiny_llama), "int4": str(tiny_llama_int4.path), "tmp": str(root), "long": "word " * 600}
    (root / "empty").mkdir()
    made["empty"] = str(root / "empty")
    (root / "a_file").write_text("not a folder")
    made["a_file"] = str(root / "a_file")
    for name in ("no_tokenizer", "truncated", "no_eos"):
        shutil.copytree(tiny_llama, root / name)
        made[name] = str(root / name)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (root / "no_tokenizer" / f).unlink(missing_ok=True)
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # a disk that filled up while saving
    config = json.loads((root / "no_eos" / "config.json").read_text())
    config["eos_token_id"] = None
    (root / "no_eos" / "config.json").write_text(json.dumps(config))
    (root / "no_eos" / "generation_config.json").unlink(missing_ok=True)
    (root / "bare_adapter").mkdir()
    (root / "bare_adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    made["bare_adapter"] = str(root / "bare_adapter")
    method2 = {
        "input_model": {"type": "HfModel", "model_path": str(tiny_llama)},
        "passes": {"builder": {"type": "ModelBuilder", "config": "int4"}},
    }
    (root / "m2.json").write_text(json.dumps(method2))
    made["bad_method2"] = str(root / "m2.json")
    return made


@pytest.fixture(scope="module")
def registry(inputs, tmp_path_factory) -> Path:
    from tests.conftest import run_cli

    path = tmp_path_factory.mktemp("bad-reg")
    assert run_cli("register", inputs["int4"], "--name", "here", env={"SLMOPS_REGISTRY_DIR": str(path)}).rc == 0
    return path


def fill(arg: str, inputs: dict[str, str], tmp: Path) -> str:
    if arg.startswith("{toml:"):
        path = tmp / "slmops.toml"
        path.write_text(arg[len("{toml:") : -1] + "\n")
        return str(path)
    for key, value in inputs.items():
        arg = arg.replace("{" + key + "}", value)
    return arg


@pytest.mark.parametrize("case, args, rc, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(cli, inputs, registry, tmp_path, case, args, rc, message):
    before = sorted(p.name for p in (registry / "custom").iterdir())
    r = cli(*[fill(a, inputs, tmp_path) for a in args], env={"SLMOPS_REGISTRY_DIR": str(registry)})
    lines = r.err.strip().splitlines()
    assert r.rc == rc, r
    assert lines and lines[-1].startswith("slmops: error:") and message in lines[-1], r
    assert "Traceback" not in r.err and ".cc:" not in r.err, r
    assert sorted(p.name for p in (registry / "custom").iterdir()) == before
    assert not (Path(inputs["tmp"]) / "reg").exists()  # refused before any work
