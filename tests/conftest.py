"""Shared fixtures: an isolated slmops home, tiny random-weight models built from a config with the default
model's tokenizer (llama and qwen2, seconds each, cached per session), and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIRD_PARTY = ROOT / "tests" / "thirdparty_plugin"


def _install_third_party_plugin() -> Path:
    """Make tests/thirdparty_plugin an installed distribution for this test run only (a dist-info with its entry
    points, from its own pyproject), so slmops finds it through the `slmops` entry point group as it would any
    pip-installed plugin, while the project's .venv used by `make demo` never carries test plugins."""
    import tempfile
    import tomllib

    project = tomllib.loads((THIRD_PARTY / "pyproject.toml").read_text())["project"]
    site = Path(tempfile.mkdtemp(prefix="slmops-test-site-"))
    dist = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    points = project["entry-points"]["slmops"]
    (dist / "entry_points.txt").write_text("[slmops]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()))
    paths = [str(site), str(THIRD_PARTY)]
    sys.path[:0] = paths
    os.environ["PYTHONPATH"] = os.pathsep.join(
        paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return site


# Before any test module imports slmops: its plugin manager loads entry points once, at import.
TEST_SITE = _install_third_party_plugin()
NEUTRAL_DIR = Path(os.environ.get("TMPDIR", "/tmp"))  # no slmops.toml above it: tests see the defaults
SLMOPS = [sys.executable, "-c", "from slmops.cli import main; main()"]


# Fixtures that make or load a model (every tiny model is built with the default model's tokenizer): a test that uses
# one, or is marked slow, is marked `model`; `make test-fast` runs the others (planning, config, templates,
# publishing, plugin contracts, quality windows), which need no model at all.
MODEL_FIXTURES = {"default_checkpoint", "default_int4"}


def pytest_unconfigure(config) -> None:
    """The test plugin's dist-info goes with the run (left behind, every run kept a folder in /tmp)."""
    import shutil

    shutil.rmtree(TEST_SITE, ignore_errors=True)


def pytest_collection_modifyitems(items: list) -> None:
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.model)


def missing_extra(error: BaseException) -> str | None:
    """The extra of slmops a test failed for want of, where that extra is not installed here: a module of it not
    found, or slmops's own one line naming it (raised, or in a command's output a test asserted on). None otherwise,
    and always where every extra is installed (make test), so there a failure stays a failure."""
    from slmops import extras

    if isinstance(error, ModuleNotFoundError):
        named = [extras.extra_of(error.name or "")]
    else:
        text = str(error)
        named = [e for e in extras.EXTRAS if extras.INSTALL.format(e) in text]
    return next((e for e in named if e and extras.missing(e)), None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """With only the core installed (make wheel-check runs the suite so), a test that needs an extra is skipped and
    says which; everything else must pass there as with every extra."""
    report = yield
    if report.failed and call.excinfo is not None:
        extra = missing_extra(call.excinfo.value)
        if extra:
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: needs slmops[{extra}], not installed")
    return report


@pytest.fixture(scope="session", autouse=True)
def slmops_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("slmops-home")
    os.environ["SLMOPS_HOME"] = str(home)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TQDM_DISABLE"] = "1"
    os.environ.pop("SLMOPS_LOAD_PLUGINS", None)
    # Tiny models are scored on a slice of the corpus (one window of each kind); the default model's tests and
    # test_corpus_metrics use the whole corpus.
    small = home / "quality-slice.jsonl"
    rows = [json.loads(line) for line in (ROOT / "src" / "slmops" / "data" / "corpus.jsonl").read_text().splitlines()]
    picked = [next(r for r in rows if r["kind"] == kind) for kind in ("prose", "code", "dialogue")]
    small.write_text("".join(json.dumps({**r, "text": r["text"][:2400]}) + "\n" for r in picked))
    os.environ["SLMOPS_QUALITY_SET"] = str(small)
    return home


@pytest.fixture()
def registry_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "registry"
    monkeypatch.setenv("SLMOPS_REGISTRY_DIR", str(path))
    return path


class Result:
    def __init__(self, done: subprocess.CompletedProcess):
        self.rc, self.out, self.err = done.returncode, done.stdout, done.stderr

    def json(self):
        return json.loads(self.out)

    def __repr__(self):
        return f"rc={self.rc}\nstdout={self.out[-2000:]}\nstderr={self.err[-2000:]}"


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, input: str | None = None, timeout: int = 600
) -> Result:
    """Run the real `slmops` command line in a child process (no terminal: stdin is empty unless input is given)."""
    full_env = {**os.environ, **(env or {})}
    done = subprocess.run(
        [*SLMOPS, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or NEUTRAL_DIR,
        env=full_env,
        input=input or "",
        timeout=timeout,
    )
    return Result(done)


@pytest.fixture(scope="session")
def cli():
    return run_cli


class InProcess:
    def __init__(self, rc: int, out: str, err: str):
        self.rc, self.out, self.err = rc, out, err

    json = Result.json
    __repr__ = Result.__repr__


def run_inprocess(*args: str, env: dict | None = None, cwd: Path | None = None) -> InProcess:
    """The real `slmops` command line in this process, for fast tests: main() (so errors are its one line) under
    click's CliRunner isolation (stdout, stderr and the environment). Plugins load once per process here, so tests
    that change which plugins load run the command in a child process (`cli`)."""
    from click.testing import CliRunner

    from slmops.cli import main

    here = os.getcwd()
    os.chdir(cwd or NEUTRAL_DIR)  # as run_cli: no slmops.toml above it unless the test made one
    try:
        with CliRunner().isolation(env=env) as (out, err, _):
            try:
                main([str(a) for a in args])
                rc = 0
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            sys.stdout.flush()
            sys.stderr.flush()
            return InProcess(rc, out.getvalue().decode(), err.getvalue().decode())
    finally:
        os.chdir(here)


@pytest.fixture(scope="session")
def cli_here():
    return run_inprocess


@pytest.fixture(scope="session")
def default_checkpoint(slmops_home) -> Path:
    """The embedded SmolLM2-135M-Instruct, turned from GGUF into a checkpoint once per session."""
    from slmops.build import sources

    return sources.resolve("default").checkpoint


def build_tiny(
    out: Path, tokenizer_dir: Path, arch: str, chat_template: str | None = None, seed: int = 0, **config
) -> Path:
    """A random-weight model of the given architecture with the default model's tokenizer (config: overrides)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    common.update(config)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(arch)
    model.save_pretrained(out)
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(out)
    if chat_template is not None:
        (out / "chat_template.jinja").write_text(chat_template)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, default_checkpoint) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama", default_checkpoint, "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, default_checkpoint) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "tiny-qwen2", default_checkpoint, "qwen2")


# A chat template no built-in family matches (so slmops derives one), opening with the tokenizer's BOS as Llama 3's
# and Gemma's do.
BOS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_llama_bos(tmp_path_factory, default_checkpoint) -> Path:
    """A tiny llama whose tokenizer puts a BOS before every text, as Llama 3's, Gemma's and Mistral's do (a
    post-processor in tokenizer.json), with a chat template that writes the BOS itself."""
    out = build_tiny(tmp_path_factory.mktemp("tiny") / "tiny-bos", default_checkpoint, "llama", BOS_TEMPLATE)
    bos = {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}},
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    for name, key, value in (
        ("tokenizer_config.json", "bos_token", "<|endoftext|>"),
        ("config.json", "bos_token_id", 0),
    ):
        data = json.loads((out / name).read_text())
        data[key] = value
        (out / name).write_text(json.dumps(data))
    return out


@pytest.fixture(scope="session")
def tiny_llama_int4(tiny_llama) -> dict:
    from slmops.build import convert

    return convert.convert(str(tiny_llama), {"precision": "int4", "algorithm": "rtn"})  # the builder's own int4


@pytest.fixture(scope="session")
def default_int4() -> Path:
    """The embedded default model's int4 as deploy builds it (the GGUF's own blocks), from the build cache."""
    from slmops.build import convert

    return Path(convert.convert(None, {"precision": "int4", "algorithm": "gguf"}).path)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, default_checkpoint):
    """Build a tiny llama with a given chat template (or none); cached by template."""
    made: dict = {}

    def make(chat_template: str | None, arch: str = "llama") -> Path:
        key = (chat_template, arch)
        if key not in made:
            out = tmp_path_factory.mktemp("tiny-tpl") / "model"
            made[key] = build_tiny(out, default_checkpoint, arch, chat_template)
            if chat_template is None:
                for f in ("chat_template.jinja",):
                    (out / f).unlink(missing_ok=True)
                cfg = json.loads((out / "tokenizer_config.json").read_text())
                cfg.pop("chat_template", None)
                (out / "tokenizer_config.json").write_text(json.dumps(cfg))
        return made[key]

    return make
