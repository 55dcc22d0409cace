"""Real conversions of tiny generated llama and qwen2 models: verification, manifest, cache, config file,
LoRA adapters, and every bad input."""

import importlib.metadata
import json
import sys
from pathlib import Path

import pytest

from slmops.build import convert, plan, verify
from slmops.errors import SlmopsError
from slmops.host.fsutil import dir_size
from slmops.measure import quality
from slmops.run import runtime

from .conftest import build_tiny


def test_int4_llama_is_verified_and_recorded(tiny_llama, tiny_llama_int4):
    result = tiny_llama_int4
    model_dir = result.path
    manifest = json.loads((model_dir / "slmops-manifest.json").read_text())
    assert manifest["source"]["architecture"] == "LlamaForCausalLM"
    assert len(manifest["source"]["sha256"]) == 64
    assert manifest["options"]["precision"] == "int4" and manifest["converter"] == "model-builder"
    assert manifest["tools"]["onnxruntime-genai"] == importlib.metadata.version("onnxruntime-genai")
    assert manifest["verification"]["ok"] and manifest["verification"]["sample"]["tokens"] > 0
    graph = verify.graph_quantization(model_dir)
    assert graph["matmul_nbits"] == {"4": graph["matmul_nbits"]["4"]} and graph["block_sizes"] == [32]
    assert graph["symmetric"] == [True] and graph["float_matmuls"] == 0
    assert manifest["output_bytes"] > 0 and manifest["timings"]["convert_s"] > 0


def test_builds_run_on_every_core(tiny_llama_int4, tmp_path):
    """ONNX Runtime GenAI runs a model whose genai_config.json names no intra-op thread count on one thread; every
    build names 0 (ONNX Runtime's own choice, one per physical core). A count already there is kept."""
    config = json.loads((tiny_llama_int4.path / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 0
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = 3
    (tmp_path / "genai_config.json").write_text(json.dumps(config))
    runtime.use_every_core(tmp_path)
    assert json.loads((tmp_path / "genai_config.json").read_text()) == config


def test_same_request_is_a_cache_hit(tiny_llama, tiny_llama_int4):
    again = convert.convert(str(tiny_llama), {"precision": "int4", "algorithm": "rtn"})
    assert again.cached and again.path == tiny_llama_int4.path and again.key == tiny_llama_int4.key


@pytest.mark.parametrize("precision, bits", [("int8", {"8"}), ("fp32", set())])
def test_qwen2_int8_and_fp32(tiny_qwen2, precision, bits):
    # int8 by MatMulNBits asked for by name (a float source's default int8 is q8_0: test_gptq)
    options = {"precision": precision, **({"algorithm": "rtn"} if precision == "int8" else {})}
    result = convert.convert(str(tiny_qwen2), options)
    assert result.manifest["source"]["architecture"] == "Qwen2ForCausalLM"
    assert set(result.verification["graph"]["matmul_nbits"]) == bits
    if precision == "int8":
        assert result.manifest["quantizer"] == "matmul-nbits"
    else:
        assert result.verification["graph"]["float_matmuls"] > 0


def test_cli_convert_to_output_json(cli, tiny_qwen2, tmp_path):
    out = tmp_path / "out"
    r = cli(
        "convert", tiny_qwen2, "--precision", "int4", "--block-size", "64", "--asymmetric", "--output", out, "--json"
    )
    assert r.rc == 0, r
    data = r.json()
    assert data["path"] == str(out) and (out / "genai_config.json").is_file()
    graph = verify.graph_quantization(out)
    assert graph["block_sizes"] == [64] and graph["symmetric"] == [False]


def test_guide_config_file_block_128_asymmetric_is_applied(cli, tiny_llama, tmp_path):
    config = {
        "input_model": {"type": "HfModel", "model_path": str(tiny_llama), "task": "text-generation"},
        "systems": {
            "local_system": {"type": "LocalSystem", "accelerators": [{"execution_providers": ["CPUExecutionProvider"]}]}
        },
        "passes": {
            "builder": {
                "type": "ModelBuilder",
                "config": {"precision": "int4", "quantization_config": {"block_size": 128, "is_symmetric": False}},
            }
        },
        "host": "local_system",
        "target": "local_system",
        "cache_dir": "cache",
        "output_dir": "models/output/your-finetuned-model-onnx",
    }
    path = tmp_path / "finetuned_conversion_config.json"
    path.write_text(json.dumps(config))
    r = cli("convert", "--config", path, "--json")
    assert r.rc == 0, r
    out = tmp_path / "models/output/your-finetuned-model-onnx"
    graph = verify.graph_quantization(out)
    assert graph["block_sizes"] == [128] and graph["symmetric"] == [False]


def test_config_key_olive_would_ignore_is_an_error(cli, tiny_llama, tmp_path):
    config = {
        "input_model": {"type": "HfModel", "model_path": str(tiny_llama)},
        "passes": {
            "builder": {
                "type": "ModelBuilder",
                "config": {"precision": "int4", "quantization_config": {"group_size": 64}},
            }
        },
    }
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    r = cli("convert", "--config", path)
    assert r.rc == 1 and "'group_size' is not supported" in r.err and len(r.err.strip().splitlines()) == 1


def test_olive_backend_builds_the_same_graph(cli, tiny_llama, tiny_llama_int4):
    r = cli("convert", tiny_llama, "--precision", "int4", "--algorithm", "rtn", "--backend", "olive", "--json")
    assert r.rc == 0, r
    result = r.json()  # stdout holds the JSON alone: Olive's and the builder's own prints are kept off it
    assert result["converter"] == "olive" and result["verification"]["ok"]
    assert result["verification"]["graph"] == tiny_llama_int4.verification["graph"]


def test_lora_adapter_is_merged(tiny_llama, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    result = convert.convert(str(tiny_llama), {"precision": "fp32", "adapter": adapter})
    assert result.verification["ok"] and result.manifest["options"]["adapter"] == str(adapter)
    merged = Path(result.manifest["source"]["checkpoint"])
    assert merged != tiny_llama and (merged / "config.json").is_file()
    # The merged weights differ from the base: the adapter was really applied.
    merged_model = AutoModelForCausalLM.from_pretrained(merged)
    assert not torch.allclose(
        merged_model.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.base_layer.weight
    )


def test_not_an_adapter_is_refused(tiny_llama, tmp_path):
    with pytest.raises(SlmopsError, match="not a PEFT adapter"):
        convert.convert(str(tiny_llama), {"precision": "fp32", "adapter": tmp_path})


@pytest.mark.parametrize(
    "args, message",
    [
        (["/no/such/model"], "does not exist"),
        (["{empty}"], "not a Hugging Face checkpoint"),
        (["{tiny}", "--precision", "fp16"], "fp16 models built for the CPU fail"),
        (["{tiny}", "--block-size", "48"], "Invalid value for '--block-size'"),
        (["{tiny}", "--backend", "nosuch"], "no converter named 'nosuch'"),
    ],
)
def test_bad_input_is_one_line(cli, tiny_llama, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    args = [a.replace("{empty}", str(tmp_path / "empty")).replace("{tiny}", str(tiny_llama)) for a in args]
    r = cli("convert", *args)
    assert r.rc != 0
    lines = r.err.strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith("slmops: error:") and "Traceback" not in r.err, r


def test_unsupported_architecture_lists_the_supported(tmp_path, tiny_llama):
    import shutil

    fake = tmp_path / "fake"
    shutil.copytree(tiny_llama, fake)
    cfg = json.loads((fake / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    (fake / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SlmopsError) as err:
        convert.convert(str(fake), {"precision": "int4"})
    message = str(err.value)
    assert message.startswith("no converter can build FooForCausalLM") and "\n" not in message
    tested, untested = message.split("tested: ", 1)[1].split("; also known to the converters, not tested here: ")
    assert "Gemma3ForCausalLM, MistralForCausalLM" in tested and "OlmoForCausalLM" in untested.split(";")[0]
    assert "Gemma3ForCausalLM" not in untested


def test_failed_build_leaves_nothing_and_keeps_earlier_output(cli, tiny_llama, tmp_path, slmops_home):
    out = tmp_path / "good"
    assert cli("convert", tiny_llama, "--precision", "fp32", "--output", out).rc == 0
    before = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    r = cli("convert", tiny_llama, "--precision", "fp32", "--backend", "failing", "--output", out)
    assert r.rc == 1 and "failed on purpose" in r.err
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == before
    leftovers = [p for p in (slmops_home / "builds").iterdir() if ".partial-" in p.name or p.name.startswith(".work-")]
    assert leftovers == []


def test_too_little_disk_is_refused(monkeypatch, tiny_qwen2):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 40 * 10**6))
    with pytest.raises(SlmopsError, match="too little disk") as err:
        convert.convert(str(tiny_qwen2), {"precision": "int4", "block_size": 16})
    # 40 MB is said as such (it used to read "0.0 GB"), and the advice is one that helps: builds live in SLMOPS_HOME
    assert "40.0 MB free" in str(err.value) and "SLMOPS_HOME" in str(err.value)


def test_interrupt_leaves_no_partial_output(monkeypatch, tiny_qwen2, slmops_home):
    from slmops.plugin import provided

    builder = next(c for c in provided.converters() if c.name == "model-builder")

    def interrupted(request, output_dir, work_dir):
        (output_dir / "model.onnx").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(builder, "convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert.convert(str(tiny_qwen2), {"precision": "fp32", "block_size": 256})
    assert not [p for p in (slmops_home / "builds").iterdir() if "partial" in p.name or p.name.startswith(".work-")]


@pytest.fixture(scope="module")
def lora_adapter(tiny_llama, tmp_path_factory) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    adapter = tmp_path_factory.mktemp("lora") / "support-bot"
    peft_model.save_pretrained(adapter)
    return adapter


def ort_logits(model_dir: Path, tokens: list[int], adapter: str | None):
    from slmops.run.runtime import Session

    return Session(model_dir, adapter or "none").logits(tokens)[-1]


def test_lora_kept_as_an_ort_genai_adapter_file(tiny_llama, lora_adapter):
    """The base stays as it is; the adapter file, switched on at run time, gives what PEFT gives."""
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = convert.convert(str(tiny_llama), {"precision": "fp32", "adapter": lora_adapter, "adapter_mode": "adapter"})
    model_dir = result.path
    assert result.verification["ok"] and result.manifest["source"]["checkpoint"] == str(tiny_llama)
    assert result.manifest["adapters"] == {"support-bot": "adapters/support-bot.onnx_adapter"}
    assert result.verification["adapter"]["max_logit_change"] > 0
    tokens = [1, 504, 3575, 282, 4649, 314]
    base_hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        want_base = base_hf(torch.tensor([tokens])).logits[0, -1].numpy()
        want_tuned = PeftModel.from_pretrained(base_hf, lora_adapter)(torch.tensor([tokens])).logits[0, -1].numpy()
    assert np.abs(want_tuned - want_base).max() > 0.1
    np.testing.assert_allclose(ort_logits(model_dir, tokens, None), want_base, atol=1e-4)
    np.testing.assert_allclose(ort_logits(model_dir, tokens, "support-bot"), want_tuned, atol=1e-4)


def test_quantized_base_keeps_the_adapter_in_float(tiny_llama, lora_adapter):
    """int4 goes fp32 build -> adapter file -> MatMulNBits around the LoRA MatMuls, which stay float."""
    result = convert.convert(str(tiny_llama), {"precision": "int4", "adapter": lora_adapter, "adapter_mode": "adapter"})
    assert (result.manifest["converter"], result.manifest["quantizer"]) == ("model-builder", "matmul-nbits")
    graph = result.verification["graph"]
    # 2 layers x 3 LoRA targets x (A, B) stay float; the 7 projections per layer and lm_head are 4-bit.
    assert graph["float_matmuls"] == 12 and graph["matmul_nbits"] == {"4": 15}
    assert result.verification["adapter"]["max_logit_change"] > 0
    assert (result.path / "adapters" / "support-bot.onnx_adapter").is_file()


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory, default_checkpoint) -> Path:
    """A tiny Llama whose embedding is its output layer (tie_word_embeddings, as SmolLM2's)."""
    return build_tiny(
        tmp_path_factory.mktemp("tied") / "tiny-tied", default_checkpoint, "llama", tie_word_embeddings=True
    )


def float_tables(model_dir: Path) -> list[str]:
    """Float initializers of [vocab, hidden] or [hidden, vocab]: an embedding or output layer kept in float."""
    import onnx

    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    tables = (onnx.TensorProto.FLOAT, [64, 49152])  # the tiny models' hidden size, the tokenizer's vocabulary
    return [i.name for i in model.graph.initializer if (i.data_type, sorted(i.dims)) == tables]


@pytest.mark.parametrize("options", [{"symmetric": True}, {"symmetric": False}, {"precision": "int8"}])
def test_a_tied_embedding_reads_the_quantized_output_layer(tiny_tied, options):
    """matmul-nbits (the route of an adapter-mode base): the Gather reads the lm_head's MatMulNBits blocks instead of
    keeping the float table for itself (SmolLM2's adapter base was 200 MB against 86 merged)."""
    import onnx

    request = {"precision": "int4", "algorithm": "rtn", **options}
    built = convert.convert(str(tiny_tied), request, quantizer_name="matmul-nbits")
    fp32 = convert.reference(str(tiny_tied), request)
    assert built.manifest["quantizer"] == "matmul-nbits" and not float_tables(built.path)
    ops = [n.op_type for n in onnx.load(str(built.path / "model.onnx"), load_external_data=False).graph.node]
    assert "GatherBlockQuantized" in ops and "Transpose" not in ops
    assert quality.compare(built.path, fp32.path).mean_kld < (1e-4 if request["precision"] == "int8" else 2e-3)


def test_an_adapter_base_of_a_tied_model_holds_no_float_table(tiny_tied):
    from .test_batch import make_lora

    lora = make_lora(tiny_tied, tiny_tied.parent / "tied-lora", seed=4)
    base = convert.convert(str(tiny_tied), {"precision": "int4", "adapter": lora, "adapter_mode": "adapter"})
    merged = convert.convert(str(tiny_tied), {"precision": "int4", "adapter": lora, "adapter_mode": "merge"})
    assert not float_tables(base.path) and base.verification["adapter"]["max_logit_change"] > 0
    assert dir_size(base.path) < 1.3 * dir_size(merged.path), (dir_size(base.path), dir_size(merged.path))


def test_model_run_switches_the_adapter_on(tiny_llama, lora_adapter, cli, registry_dir):
    result = convert.convert(str(tiny_llama), {"precision": "int4", "adapter": lora_adapter, "adapter_mode": "adapter"})
    assert cli("register", result.path, "--name", "tiny-lora").rc == 0
    run = ("model", "run", "tiny-lora", "-p", "Hi", "--max-new-tokens", "6", "--json")
    tuned, base = cli(*run).json(), cli(*run, "--adapter", "none").json()
    assert (tuned["engine"], tuned["adapter"]) == ("ort-genai", "support-bot") and base["adapter"] is None
    assert tuned["answer"] != base["answer"]
    bad = cli("model", "run", "tiny-lora", "-p", "Hi", "--adapter", "nope")
    assert bad.rc == 1 and "has no adapter 'nope' (it has: support-bot)" in bad.err and "Traceback" not in bad.err


def test_plan_takes_the_cheapest_route(tiny_llama):
    """The test plugin's failing converter claims int8 directly at cost 1000: builder + quantizer (20) wins."""
    from slmops.plugin.roles import ConvertRequest

    int8 = ConvertRequest(source_dir=tiny_llama, precision="int8", algorithm="rtn")
    route = plan.plan(int8, "LlamaForCausalLM")
    assert (route.converter.name, route.quantizer.name, route.cost) == ("model-builder", "matmul-nbits", 20)
    assert "failing (cost 1000)" in route.alternatives
    # int8 by default for a float source: the builder's fp32, then Q8_0 blocks in every weight
    route = plan.plan(ConvertRequest(source_dir=tiny_llama, precision="int8"), "LlamaForCausalLM")
    assert (route.converter.name, route.quantizer.name) == ("model-builder", "q8_0")
    route = plan.plan(ConvertRequest(source_dir=tiny_llama, precision="int4", algorithm="rtn"), "LlamaForCausalLM")
    assert (route.converter.name, route.quantizer) == ("model-builder", None)
    # int4 by default ("auto") for a float source: the builder's fp32, then gptq
    route = plan.plan(ConvertRequest(source_dir=tiny_llama, precision="int4"), "LlamaForCausalLM")
    assert (route.converter.name, route.quantizer.name) == ("model-builder", "gptq")
    route = plan.plan(int8, "LlamaForCausalLM", "failing")
    assert (route.converter.name, route.quantizer) == ("failing", None)


def test_hqq_fits_float_zero_points_and_is_closer_to_fp32(tiny_qwen2):
    """HQQ (data-free, Olive's OnnxHqqQuantization algorithm) goes fp32 -> matmul-nbits; it must beat plain RTN."""
    import onnx

    from slmops.measure import quality

    hqq = convert.convert(str(tiny_qwen2), {"precision": "int4", "algorithm": "hqq", "symmetric": False})
    assert (hqq.manifest["converter"], hqq.manifest["quantizer"]) == ("model-builder", "matmul-nbits")
    graph = hqq.verification["graph"]
    assert graph["symmetric"] == [False] and graph["block_sizes"] == [32] and graph["accuracy_levels"] == [4]
    model = onnx.load(str(hqq.path / "model.onnx"), load_external_data=False)
    zero_points = {i.name: i.data_type for i in model.graph.initializer if i.name.endswith("zero_points")}
    assert zero_points and set(zero_points.values()) == {onnx.TensorProto.FLOAT}
    rtn = convert.convert(str(tiny_qwen2), {"precision": "int4", "algorithm": "rtn", "symmetric": False})
    fp32 = convert.convert(str(tiny_qwen2), {"precision": "fp32"}).path
    assert quality.compare(hqq.path, fp32).mean_kld < quality.compare(rtn.path, fp32).mean_kld


def test_hqq_asks_for_asymmetric(tiny_qwen2):
    with pytest.raises(SlmopsError, match="hqq fits a zero point per block: add --asymmetric"):
        convert.convert(str(tiny_qwen2), {"precision": "int4", "algorithm": "hqq"})


def test_a_changed_source_or_tool_version_is_a_new_build(tiny_llama, tmp_path, monkeypatch):
    # The cache key is the source's content (not its path), the options and the tool versions.
    import shutil

    from safetensors.torch import load_file, save_file

    first = convert.convert(str(tiny_llama), {"precision": "fp32"})
    copy = tmp_path / "moved"
    shutil.copytree(tiny_llama, copy)
    moved = convert.convert(str(copy), {"precision": "fp32"})
    assert moved.cached and moved.key == first.key
    weights = load_file(copy / "model.safetensors")
    name = next(n for n in weights if "down_proj" in n)
    weights[name] = weights[name] * 1.5
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    changed = convert.convert(str(copy), {"precision": "fp32"})
    assert not changed.cached and changed.key != first.key
    real = convert.tool_versions()
    monkeypatch.setattr(convert, "tool_versions", lambda: {**real, "onnxruntime-genai": "0.0.1"})
    upgraded = convert.convert(str(tiny_llama), {"precision": "fp32"})
    assert not upgraded.cached and upgraded.key not in (first.key, changed.key)
    assert upgraded.manifest["tools"]["onnxruntime-genai"] == "0.0.1"


def test_a_changed_plugin_makes_new_builds(tmp_path, monkeypatch, tiny_llama):
    """The cache key names the code of the converter and quantizer: a plugin upgraded (or, shipped by no
    distribution, edited) does not have its old builds reused."""
    import importlib.util

    import slmops
    from slmops.plugin import provided

    module = tmp_path / "slmops_edited_plugin.py"
    module.write_text("from slmops.api import Converter\n\nclass Edited(Converter):\n    name = 'edited'\n")

    def load():
        spec = importlib.util.spec_from_file_location("slmops_edited_plugin", module)
        loaded = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, "slmops_edited_plugin", loaded)
        spec.loader.exec_module(loaded)
        return loaded.Edited()

    before = convert.plugin_code(load())
    module.write_text(module.read_text() + "    description = 'changed'\n")
    assert convert.plugin_code(load()) != before
    builder = next(c for c in provided.converters() if c.name == "model-builder")
    version = f"slmops {importlib.metadata.version('slmops')}"
    if convert.installed_copy(Path(sys.modules[type(builder).__module__].__file__)):
        assert convert.plugin_code(builder) == version
    else:  # this checkout, installed editable (make install): the version and the sources as they are now
        folders = [Path(slmops.__file__).parent, Path(sys.modules[type(builder).__module__].__file__).parent]
        assert convert.plugin_code(builder) == f"{version}, checkout {convert.sources_hash(sorted(folders))}"
    # an edited file of a checkout changes its hash; its compiled bytecode does not
    package = tmp_path / "checkout"
    (package / "__pycache__").mkdir(parents=True)
    (package / "plugin.py").write_text("x = 1\n")
    hashed = convert.sources_hash([package])
    (package / "__pycache__" / "plugin.cpython-311.pyc").write_bytes(b"compiled")
    assert convert.sources_hash([package]) == hashed
    (package / "plugin.py").write_text("x = 2\n")
    assert convert.sources_hash([package]) != hashed

    first = convert.convert(str(tiny_llama), {"precision": "fp32"})
    assert first.manifest["code"] == [convert.plugin_code(builder), None]
    monkeypatch.setattr(convert, "plugin_code", lambda implementation: "slmops 99.0")
    upgraded = convert.convert(str(tiny_llama), {"precision": "fp32"})
    assert not upgraded.cached and upgraded.key != first.key


def test_a_quantized_build_starts_from_the_cached_fp32_graph_and_comes_out_the_same(tiny_qwen2, tmp_path, monkeypatch):
    """deploy and bench build a source's fp32 reference first; its quantized builds then copy that graph instead of
    converting again, and come out byte for byte as from their own conversion. A reference changed since it was
    verified is not used."""
    import shutil

    from slmops.build.store import MANIFEST
    from slmops.host.fsutil import file_hashes
    from slmops.plugins.model_builder import ModelBuilderConverter

    monkeypatch.setenv("SLMOPS_HOME", str(tmp_path / "home"))

    def made(build) -> dict:  # its files' hashes; genai_config.json as what it says (its keys' order may differ)
        config = json.loads((build.path / "genai_config.json").read_text())
        return {**file_hashes(build.path, skip=(MANIFEST, "genai_config.json")), "genai_config.json": config}

    alone = convert.convert(str(tiny_qwen2), {"precision": "int8"})
    expected = made(alone)
    shutil.rmtree(alone.path)
    reference = convert.reference(str(tiny_qwen2), {"precision": "int8"})

    def refuse(*args):
        raise AssertionError("the model builder ran again")

    monkeypatch.setattr(ModelBuilderConverter, "convert", refuse)
    again = convert.convert(str(tiny_qwen2), {"precision": "int8"})
    assert not again.cached and made(again) == expected
    with open(reference.path / "model.onnx.data", "r+b") as f:  # the reference changed: not used, nothing copied
        f.write(b"\0\0\0\0")
    into = tmp_path / "into"
    into.mkdir()
    spec = convert.build_spec(str(tiny_qwen2), {"precision": "int8"}, "auto", "auto")
    assert convert.cached_fp32(spec, into) is None and not any(p.is_file() for p in into.rglob("*"))
