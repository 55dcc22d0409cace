"""The plugin API as a third party meets it: one public module, lazy loading, choosing by name, contracts, installing
plugins, and an import that works on Windows and macOS too."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PLUGINS = SRC / "slmops" / "plugins"


def _slmops_imports(path: Path) -> list[str]:
    """Every slmops module a file imports (relative imports spelled out against its package)."""
    if path.is_relative_to(SRC):
        package = ".".join(path.parent.relative_to(SRC).parts)
    else:  # a third-party plugin, or the checker's own sample
        package = "slmops.plugins" if path.parent.name == "plugins" else "slmops"
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "slmops"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
                found += [module] if node.module else [f"{base}.{a.name}" for a in node.names]
            elif (
                node.module and node.module.split(".")[0] == "slmops"
            ):  # `from slmops.build import convert`: the module
                found += [_module_or(f"{node.module}.{a.name}", node.module) for a in node.names]
    return list(dict.fromkeys(found))


def _module_or(name: str, package: str) -> str:
    """name where it is a module of slmops's source, else package (the name is a function or class in it)."""
    path = SRC.joinpath(*name.split("."))
    return name if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file() else package


def test_plugins_use_only_the_public_api():
    offenders = {}
    for path in [*PLUGINS.glob("*.py"), *(ROOT / "tests" / "thirdparty_plugin").rglob("*.py")]:
        bad = [m for m in _slmops_imports(path) if m != "slmops.api" and not m.startswith("slmops.plugins")]
        if bad:
            offenders[path.name] = bad
    assert not offenders, f"plugins may import slmops.api only: {offenders}"


def test_the_core_imports_no_plugin():
    offenders = {
        p.name: [m for m in _slmops_imports(p) if m.startswith("slmops.plugins")] for p in _core_modules().values()
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_the_checker_sees_a_forbidden_import(tmp_path):
    # The two tests above pass vacuously if the AST walk misses imports: show it catches each spelling.
    (tmp_path / "plugins").mkdir()
    sample = tmp_path / "plugins" / "p.py"
    sample.write_text(
        "from slmops.host.fsutil import lock\nimport slmops.plugin.roles\nfrom .. import config\nfrom slmops.api import hookimpl\n"
    )
    assert _slmops_imports(sample) == ["slmops.host.fsutil", "slmops.plugin.roles", "slmops.config", "slmops.api"]


def _core_modules() -> dict[str, Path]:
    """slmops's own modules, the built-in plugins and the data folder's scripts left out."""
    out = {}
    for path in (SRC / "slmops").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[1] not in ("plugins", "data"):
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _import_circles(modules: dict[str, Path]) -> list[list[str]]:
    """The groups of core modules that import each other round a circle (imports inside functions count: a circle
    deferred to call time is still one), by Tarjan's strongly connected components."""
    edges = {m: [i for i in _slmops_imports(p) if i in modules and i != m] for m, p in modules.items()}
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on.add(m)
        for n in edges[m]:
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            group = []
            while True:
                n = stack.pop()
                on.discard(n)
                group.append(n)
                if n == m:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for m in modules:
        if m not in index:
            visit(m)
    return circles


def test_the_core_has_no_import_circle():
    """Modules layered, each importing only below itself (issue 31 item 6: adapters <-> runtime and the templates'
    detection <-> rendering were circles, deferred by imports inside functions)."""
    assert not _import_circles(_core_modules())


def test_the_circle_finder_sees_a_circle(tmp_path):
    # the test above passes vacuously if the finder misses circles: two modules importing each other, one lazily
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from . import a\n")
    (tmp_path / "c.py").write_text("from . import a\n")
    modules = {f"slmops.{n}": tmp_path / f"{n}.py" for n in "abc"}
    assert _import_circles(modules) == [["slmops.a", "slmops.b"]]


PLATFORM_CHECK = textwrap.dedent("""
    import ast, importlib, pkgutil, sys
    from pathlib import Path
    platform = sys.argv[1]
    import slmops, slmops.plugins
    from slmops import extras
    names = [m.name for m in pkgutil.walk_packages(slmops.__path__, "slmops.")]
    # Only serve.py, the module of `slmops serve`, imported after its extra is checked, may import an extra at import
    # time; where that extra is not installed (the suite with only the core) it is left out, and nothing else is.
    EXTRA_MODULES = {"slmops.run.serve": "serve"}
    for name, extra in EXTRA_MODULES.items():
        if extras.missing(extra):
            names.remove(name)
    # Third-party libraries branch on the platform themselves (filelock imports msvcrt on Windows): import them as
    # they are here, then pretend to be the other platform for slmops's own modules only.
    for name in names:
        tree = ast.parse(Path(importlib.util.find_spec(name).origin).read_text())
        for node in tree.body:
            if isinstance(node, ast.Import):
                wanted = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                wanted = [(node.module, a.name) for a in node.names]
            else:
                continue
            for module, attribute in wanted:
                if module.split(".")[0] in ("slmops", "__future__", "fcntl", "resource", "termios", "pwd", "grp"):
                    continue
                extra = extras.extra_of(module)
                assert not extra or name in EXTRA_MODULES, f"{name} imports {module} (slmops[{extra}]) at import"
                loaded = importlib.import_module(module)
                if attribute and not hasattr(loaded, attribute):  # a submodule
                    importlib.import_module(module + "." + attribute)
    if platform != "linux":
        sys.platform = platform
        for unix_only in ("fcntl", "resource", "termios", "pwd", "grp"):
            sys.modules[unix_only] = None  # importing it now raises ImportError, as on Windows
    for name in names:
        importlib.import_module(name)
    from slmops.plugin import plugin_manager
    assert not plugin_manager._loaded, "importing slmops modules loaded the plugins"
    from slmops.cli import main
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0, e.code
    print(len(names), "modules")
""")


@pytest.mark.parametrize("platform", ["linux", "win32", "darwin"])
def test_every_module_imports_and_help_runs_on(platform, tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", PLATFORM_CHECK, platform], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "deploy" in done.stdout and int(done.stdout.split()[-2]) >= 30, done.stdout[-500:]


def test_quantizer_is_chosen_by_name_and_dry_run_shows_the_route(cli, tiny_llama):
    rtn = ("--precision", "int4", "--algorithm", "rtn")  # int4's default for a float source is gptq, a quantizer too
    r = cli("convert", str(tiny_llama), *rtn, "--quantizer", "matmul-nbits", "--dry-run", "--json")
    assert r.rc == 0, r
    plan = r.json()
    assert (plan["converter"], plan["quantizer"]) == ("model-builder", "matmul-nbits")
    assert plan["route"] == "model-builder (fp32) + matmul-nbits" and plan["cached"] is False
    assert any(why.startswith("model-builder: builds int4 itself, but --quantizer") for why in plan["rejected"])
    assert not Path(plan["path"]).exists()  # nothing was built
    plan = cli("convert", str(tiny_llama), *rtn, "--dry-run", "--json").json()
    assert plan["route"] == "model-builder" and "olive (cost 50)" in plan["alternatives"]
    plan = cli("convert", str(tiny_llama), "--precision", "int4", "--dry-run", "--json").json()
    assert plan["route"] == "model-builder (fp32) + gptq"
    r = cli("convert", str(tiny_llama), "--precision", "int4", "--quantizer", "nope", "--dry-run")
    assert r.rc == 1 and "no quantizer named 'nope'; installed: matmul-nbits, gguf-native, imatrix" in r.err


def test_choices_come_from_the_loaded_plugins(cli, tiny_llama):
    r = cli("convert", str(tiny_llama), "--precision", "int3", "--dry-run")
    assert r.rc != 0 and "no installed plugin offers precision 'int3'; use one of fp16, fp32, int4, int8" in r.err, r
    r = cli("convert", str(tiny_llama), "--device", "gpu", "--dry-run")
    assert r.rc != 0 and "no installed plugin offers device 'gpu'; use one of cpu" in r.err, r
    r = cli("convert", str(tiny_llama), "--algorithm", "magic", "--dry-run")
    assert r.rc != 0 and "int4 algorithm 'magic'" in r.err and "gguf" in r.err, r
    # Without the gguf-native plugin, its algorithm is no longer offered.
    r = cli(
        "convert", str(tiny_llama), "--algorithm", "gguf", "--dry-run", env={"SLMOPS_DISABLE_PLUGINS": "gguf_native"}
    )
    assert r.rc != 0 and "int4 algorithm 'gguf'" in r.err, r


def test_a_benchmarker_is_held_to_its_contract_and_its_extra_metrics_are_shown(cli, tmp_path, tiny_llama_int4):
    from tests.test_core import _plugin_dist

    env = _plugin_dist(
        tmp_path,
        "slmops-stopwatch",
        "stopwatch",
        textwrap.dedent("""
        from slmops.api import Benchmarker, hookimpl

        class Stopwatch(Benchmarker):
            name = "stopwatch"
            def run(self, model_dir, settings, progress):
                return {"decode_tok_s": 12.5, "ttft_ms_p50": 40.0, "joules_per_token": 0.25}

        class Broken(Benchmarker):
            name = "forgetful"
            def run(self, model_dir, settings, progress):
                return {"decode_tok_s": 3.0}

        @hookimpl
        def register_benchmarkers(register):
            register(Stopwatch())
            register(Broken())
    """),
    )
    report = tmp_path / "report"
    r = cli(
        "bench",
        tiny_llama_int4.path,
        "--benchmarker",
        "stopwatch",
        "--no-quality",
        "--no-edge-cases",
        "--report",
        str(report),
        env=env,
    )
    assert r.rc == 0, r
    assert "joules_per_token" in r.out and "0.25" in r.out
    text = (report / "report.md").read_text()
    assert "| joules_per_token | 0.25 |" in text and "Decode 12.5 tok/s" in text
    r = cli("bench", tiny_llama_int4.path, "--benchmarker", "forgetful", "--no-quality", "--no-edge-cases", env=env)
    assert (
        r.rc == 1 and "benchmarker 'forgetful' returned no number for ttft_ms_p50" in r.err and "Traceback" not in r.err
    )


def _tutorial_file(caption: str) -> str:
    """The code block that follows ``caption`` in docs/plugins.md's tutorial."""
    text = (ROOT / "docs" / "plugins.md").read_text()
    after = text[text.index(caption) :]
    start = after.index("```") + after[after.index("```") :].index("\n") + 1
    return after[start : after.index("```", start)]


def test_the_tutorial_plugin_installs_works_and_uninstalls(cli, tmp_path, registry_dir):
    # docs/plugins.md's tutorial, as written: its files, `slmops install -e .`, its family and command, uninstall.
    project = tmp_path / "slmops-myfam"
    (project / "slmops_myfam").mkdir(parents=True)
    (project / "pyproject.toml").write_text(_tutorial_file("`pyproject.toml`:"))
    (project / "slmops_myfam" / "__init__.py").write_text(_tutorial_file("`slmops_myfam/__init__.py`:"))
    try:
        r = cli("install", "--no-deps", "-q", "-e", str(project))
        assert r.rc == 0, r
        rows = cli("plugins", "--json").json()
        assert {"name": "myfam", "package": "slmops-myfam", "version": "0.1.0"}.items() <= next(
            p for p in rows["plugins"] if p["name"] == "myfam"
        ).items()
        assert {
            "role": "template family",
            "name": "myfam",
            "plugin": "myfam",
            "package": "slmops-myfam",
        }.items() <= next(i for i in rows["implementations"] if i["name"] == "myfam").items()
        shown = cli("templates", "show", "myfam", "--json").json()
        assert shown["plugin"] == "myfam" and shown["ModelConfig"]["max_length"] == 4096
        r = cli("myfam-models")
        assert r.rc == 0 and r.out == "", r  # the command runs against the (empty) registry the config names
    finally:
        r = cli("uninstall", "-y", "slmops-myfam")
    assert r.rc == 0, r
    assert "myfam" not in {p["name"] for p in cli("plugins", "--json").json()["plugins"]}
    # No -y and no input: were the guard gone, pip would stop at its prompt instead of removing slmops here.
    r = cli("uninstall", "slmops")
    assert r.rc == 2 and "would remove slmops itself" in r.err


DYNAMIC_INT8 = textwrap.dedent("""
    from pydantic import Field
    from slmops.api import MODEL_FILES, PluginOptions, Quantizer, copy_tree, hookimpl, options_of

    class Options(PluginOptions):
        reduce_range: bool = Field(False, description="7-bit weights (for CPUs without VNNI)")

    class DynamicInt8(Quantizer):
        name = "dynamic-int8"
        description = "onnxruntime quantize_dynamic: int8 weights, MatMulInteger"
        precisions = ("int8",)
        cost = 100
        declares = "MatMulInteger"
        Options = Options

        def quantize(self, fp32_dir, output_dir, request):
            from onnxruntime.quantization import QuantType, quantize_dynamic

            options = options_of(self, request)
            copy_tree(fp32_dir, output_dir, skip=MODEL_FILES)
            quantize_dynamic(str(fp32_dir / "model.onnx"), str(output_dir / "model.onnx"), weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul"], use_external_data_format=True,
                             reduce_range=options.reduce_range)

        def graph_facts(self, request):
            return {"ops": [self.declares]}

    class Liar(DynamicInt8):
        name = "liar"
        declares = "MatMulNBits"  # says it writes MatMulNBits; writes MatMulInteger

    @hookimpl
    def register_quantizers(register):
        register(DynamicInt8())
        register(Liar())
""")


def test_a_quantizer_of_another_kind_is_judged_by_the_facts_it_declares(cli, tmp_path, tiny_llama):
    # A dynamic-int8 quantizer (MatMulInteger, no MatMulNBits) builds, verifies and generates; one whose declared
    # facts are false is refused.
    from tests.test_core import _plugin_dist

    env = _plugin_dist(tmp_path, "slmops-dynamic-int8", "dynamicint8", DYNAMIC_INT8)
    r = cli("convert", str(tiny_llama), "--precision", "int8", "--quantizer", "dynamic-int8", "--json", env=env)
    assert r.rc == 0, r
    build = r.json()
    assert build["quantizer"] == "dynamic-int8" and build["verification"]["graph"]["ops"]["MatMulInteger"] > 0
    assert build["verification"]["graph"]["matmul_nbits"] == {} and build["verification"]["sample"]["tokens"] > 0
    r = cli("convert", str(tiny_llama), "--precision", "int8", "--quantizer", "liar", "--json", env=env)
    assert r.rc == 1 and "the quantizer declared MatMulNBits nodes, but the graph has none" in r.err, r


def largest_int8_weight(model_dir: Path) -> int:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_dir / "model.onnx"))  # its external data beside it
    int8 = [numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    return max(int(abs(a.astype(int)).max()) for a in int8 if a.ndim == 2)


def test_a_plugin_option_reaches_the_plugin_and_makes_another_build(cli, tmp_path, tiny_llama):
    # [plugins.NAME] in slmops.toml and --option NAME.KEY=VALUE both reach the plugin's Options, checked before any
    # work, listed by `slmops plugins`, and part of the cache key.
    from tests.test_core import _plugin_dist

    env = _plugin_dist(tmp_path, "slmops-dynamic-int8", "dynamicint8", DYNAMIC_INT8)
    listed = cli("plugins", "--json", env=env).json()["options"]
    assert {"option": "dynamic-int8.reduce_range", "type": "bool", "default": False} in [
        {k: o[k] for k in ("option", "type", "default")} for o in listed
    ]
    assert "gptq.learned_scales" in {o["option"] for o in listed}
    int8 = ("convert", str(tiny_llama), "--precision", "int8", "--quantizer", "dynamic-int8", "--json")
    plain = cli(*int8, env=env)
    flagged = cli(*int8, "--option", "dynamic-int8.reduce_range=true", env=env)
    assert plain.rc == 0 and flagged.rc == 0, (plain, flagged)
    assert flagged.json()["path"] != plain.json()["path"]  # another build, not the cached one
    # another plugin's options do not make another build of this route
    other = cli(*int8, "--option", "gptq.learned_scales=5", env=env)
    assert other.rc == 0 and other.json()["path"] == plain.json()["path"], other
    assert largest_int8_weight(Path(plain.json()["path"])) > 64 >= largest_int8_weight(Path(flagged.json()["path"]))
    project = tmp_path / "project"
    project.mkdir()
    (project / "slmops.toml").write_text("[plugins.dynamic-int8]\nreduce_range = true\n")
    from_file = cli(*int8, env=env, cwd=project)
    assert from_file.rc == 0 and from_file.json()["path"] == flagged.json()["path"], from_file
    r = cli(*int8, "--option", "dynamic-int8.reduce_range=maybe", env=env)
    assert r.rc == 1 and "option dynamic-int8.reduce_range: Input should be a valid boolean" in r.err, r


MISREADER = textwrap.dedent("""
    import json, shutil, subprocess, sys
    from slmops.api import Converter, hookimpl

    class Misreader(Converter):
        name = "misreader"
        description = "the builder's CLI on a config whose RoPE theta it got wrong"
        precisions = ("fp32",)
        cost = 1000

        def convert(self, request, output_dir, work_dir):
            misread = work_dir / "misread"
            shutil.copytree(request.source_dir, misread)
            config = json.loads((misread / "config.json").read_text())
            config["rope_parameters"]["rope_theta"] = 1000000.0  # the source says 10,000
            (misread / "config.json").write_text(json.dumps(config))
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(misread), "-o",
                            str(output_dir), "-p", "fp32", "-e", "cpu", "-c", str(work_dir / "cache"),
                            "--extra_options", "hf_token=false"], check=True, capture_output=True)

    @hookimpl
    def register_converters(register):
        register(Misreader())
""")


def test_a_converter_that_misreads_the_config_is_caught_by_the_source(cli, tmp_path, tiny_llama):
    # The graph reads back fine and generates; only the comparison with the source in torch can see the wrong RoPE.
    from tests.test_core import _plugin_dist

    env = _plugin_dist(tmp_path, "slmops-misreader", "misreader", MISREADER)
    r = cli("convert", str(tiny_llama), "--precision", "fp32", "--backend", "misreader", "--json", env=env)
    [error] = [line for line in r.err.splitlines() if "does not match its source in torch" in line]
    assert r.rc == 1 and "first diverging at position" in error, r


LIARS = textwrap.dedent("""
    import subprocess, sys
    from slmops.api import MODEL_FILES, Converter, Quantizer, copy_tree, hookimpl

    class BlockLiar(Quantizer):
        name = "block-liar"
        description = "asked any block size, writes blocks of 32"
        precisions = ("int4",)

        def quantize(self, fp32_dir, output_dir, request):
            import onnx
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32_dir / "model.onnx")), bits=4, block_size=32,
                                             is_symmetric=request.symmetric)
            quantizer.process()
            quantizer.model.save_model_to_file(str(output_dir / "model.onnx"), use_external_data_format=True)
            copy_tree(fp32_dir, output_dir, skip=MODEL_FILES)

    class Perturber(Converter):
        name = "perturber"
        description = "the builder's fp32 graph with one weight tensor scaled by 1.5"
        precisions = ("fp32",)
        cost = 1000

        def convert(self, request, output_dir, work_dir):
            import onnx
            from onnx import numpy_helper

            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(request.source_dir),
                            "-o", str(work_dir / "built"), "-p", "fp32", "-e", "cpu", "-c", str(work_dir / "cache"),
                            "--extra_options", "hf_token=false"], check=True, capture_output=True)
            model = onnx.load(str(work_dir / "built" / "model.onnx"))
            weight = next(t for t in model.graph.initializer if "layers.1" in t.name and "down_proj" in t.name)
            weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
            onnx.save(model, str(output_dir / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
            copy_tree(work_dir / "built", output_dir, skip=MODEL_FILES)

    class EosMisreader(Perturber):
        name = "eos-misreader"
        description = "the builder's fp32 folder, with an eos id it did not read from the source"

        def convert(self, request, output_dir, work_dir):
            import json

            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(request.source_dir),
                            "-o", str(output_dir), "-p", "fp32", "-e", "cpu", "-c", str(work_dir / "cache"),
                            "--extra_options", "hf_token=false"], check=True, capture_output=True)
            genai = json.loads((output_dir / "genai_config.json").read_text())
            genai["model"]["eos_token_id"] = [5]
            (output_dir / "genai_config.json").write_text(json.dumps(genai))

    @hookimpl
    def register_quantizers(register):
        register(BlockLiar())

    @hookimpl
    def register_converters(register):
        register(Perturber())
        register(EosMisreader())
""")


def test_plugins_that_lie_about_what_they_wrote_are_caught(cli, tmp_path, tiny_llama):
    # Asked blocks of 128, wrote 32: the graph read back says so. One weight tensor perturbed: the graph is sound
    # and generates, only the comparison with the source in torch sees it. An eos the source never named: the
    # model would run past the end of its answers.
    from tests.test_core import _plugin_dist

    env = _plugin_dist(tmp_path, "slmops-liars", "liars", LIARS)
    r = cli("convert", str(tiny_llama), "--precision", "int4", "--block-size", "128", "--quantizer", "block-liar",
            env=env)  # fmt: skip
    assert r.rc == 1 and "asked block size 128 but the graph has [32]" in r.err, r
    r = cli("convert", str(tiny_llama), "--precision", "fp32", "--backend", "perturber", env=env)
    [error] = [line for line in r.err.splitlines() if "does not match its source in torch" in line]
    assert r.rc == 1 and "first diverging at position" in error, r
    r = cli("convert", str(tiny_llama), "--precision", "fp32", "--backend", "eos-misreader", env=env)
    assert r.rc == 1 and "does not stop at end-of-text ids [2]" in r.err and "it stops at [5]" in r.err, r


def test_olive_code_lives_in_its_plugin():
    """Olive is run by its plugin alone (issue 31: Olive-specific code leaves the core): no core module imports olive."""
    olive = {
        p.name
        for p in _core_modules().values()
        for node in ast.walk(ast.parse(p.read_text()))
        if (isinstance(node, ast.Import) and any(a.name.split(".")[0] == "olive" for a in node.names))
        or (isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "olive")
    }
    assert not olive, olive


def test_a_lora_kept_apart_needs_a_converter_that_extracts_adapters(monkeypatch, tmp_path):
    """--adapter-mode adapter goes through the converter plugin that declares extracts_adapters (Olive's); with none
    loaded, the request is refused before any build, in one line that says what to do."""
    from slmops.build import plan
    from slmops.errors import SlmopsError
    from slmops.plugin import provided
    from slmops.plugin.roles import ConvertRequest

    real = provided.converters()
    assert [c.name for c in real if c.extracts_adapters] == ["olive"]
    monkeypatch.setattr(provided, "converters", lambda: [c for c in real if not c.extracts_adapters])
    request = ConvertRequest(source_dir=tmp_path, precision="fp32", adapter=tmp_path, adapter_mode="adapter")
    assert request.keeps_adapter
    with pytest.raises(SlmopsError, match=r"extracts adapters .*slmops\[olive\].*--adapter-mode merge"):
        plan.plan(request, "LlamaForCausalLM")
