"""A GGUF source at its own quantization: every supported block type read exactly, the graph slmops writes
dequantizes to exactly the GGUF's values (read back from model.onnx), embeddings included, and it generates."""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from slmops.build import convert
from slmops.plugin.roles import ConvertRequest
from slmops.plugins import gguf_blocks, gguf_native

from .conftest import build_tiny

T = gguf.GGMLQuantizationType
# fp16 fields of each block type and the size to give them (small enough that the model stays finite)
FP16_FIELDS = {
    "Q4_0": [(0, 1e-2)],
    "Q5_0": [(0, 1e-2)],
    "Q8_0": [(0, 1e-3)],
    "Q4_1": [(0, 1e-2), (2, -5e-2)],
    "Q5_1": [(0, 5e-3), (2, -5e-2)],
    "Q4_K": [(0, 5e-4), (2, 5e-4)],
    "Q5_K": [(0, 3e-4), (2, 3e-4)],
    "Q6_K": [(208, 5e-5)],
}


def random_blocks(kind: str, rows: int, cols: int, rng) -> np.ndarray:
    """Valid raw GGUF blocks of a type, [rows, bytes per row]: random codes and scale bits, finite fp16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[T[kind]]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for offset, scale in FP16_FIELDS[kind]:
        values = (rng.uniform(0.2, 1.0, len(raw)) * scale).astype(np.float16)
        raw[:, offset : offset + 2] = values.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", gguf_blocks.SUPPORTED)
def test_block_form_gives_back_the_gguf_values_exactly(kind):
    rng = np.random.default_rng(1)
    raw = random_blocks(kind, 8, 512, rng)
    values = gguf.quants.dequantize(raw, T[kind])
    form = gguf_blocks.block_form(kind, raw, values)
    assert np.array_equal(form.dequantize(), values)
    assert form.codes.max() < 2**form.bits
    if kind in ("Q4_1", "Q4_K", "Q5_1", "Q5_K"):
        assert form.offsets is not None and np.abs(form.offsets).max() > 0  # the minimum travels as an offset


def gguf_of_fp32_graph(fp32_dir: Path, out_dir: Path, kind: str, gguf_path: Path) -> dict[str, np.ndarray]:
    """Make the fp32 model hold the dequantized values of random blocks of one type and write those blocks as a
    GGUF: the same relation a GGUF source has with its dequantized checkpoint's fp32 build."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(fp32_dir / "model.onnx"))
    matmul_weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    tables = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    writer = gguf.GGUFWriter(str(gguf_path), "llama")
    rng = np.random.default_rng(0)
    values = {}
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim != 2 or w.dtype != np.float32 or init.name not in matmul_weights | tables:
            continue
        rows, cols = w.T.shape if init.name in matmul_weights else w.shape
        raw = random_blocks(kind, rows, cols, rng)
        v = gguf.quants.dequantize(raw, T[kind])
        v = v.T if init.name in matmul_weights else v
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(v), init.name))
        writer.add_tensor(init.name.replace("/", "."), raw, raw_dtype=T[kind])
        values[init.name] = v
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out_dir.mkdir()
    for f in fp32_dir.iterdir():
        if f.name not in ("model.onnx", "model.onnx.data"):
            (out_dir / f.name).write_bytes(f.read_bytes())
    onnx.save(model, str(out_dir / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return values


@pytest.mark.parametrize(
    "kind,tied",
    [
        ("Q4_0", False),
        ("Q4_1", False),
        ("Q4_1", True),
        ("Q8_0", False),
        ("Q4_K", False),
        ("Q5_K", False),
        ("Q6_K", True),
    ],
)
def test_gguf_import_is_exact_from_the_graph(kind, tied, default_checkpoint, tmp_path):
    import onnx

    from slmops.run.runtime import Session

    # rows of 256 so that K-quants fit (their super-blocks are 256 wide)
    tiny = build_tiny(
        tmp_path / "tiny", default_checkpoint, "llama", hidden_size=256, intermediate_size=512, tie_word_embeddings=tied
    )
    fp32 = convert.convert(str(tiny), {"precision": "fp32"}).path
    source = tmp_path / "source-fp32"
    weights = gguf_of_fp32_graph(fp32, source, kind, tmp_path / f"tiny.{kind}.gguf")
    out = tmp_path / "out"
    out.mkdir()
    request = ConvertRequest(
        source_dir=tiny, precision="int4", algorithm="gguf", gguf=tmp_path / f"tiny.{kind}.gguf", accuracy_level=1
    )
    gguf_native.GGUFNative().quantize(source, out, request)

    back = gguf_native.read_back(out)
    report = json.loads((out / gguf_native.REPORT).read_text())
    assert report["approximate"] == {} and set(report["exact"]) == {kind}
    matmuls = {n: v for n, v in weights.items() if not n.startswith("model.embed_tokens")}
    assert set(back) == set(matmuls) | {f"{'lm_head.MatMul.weight' if tied else 'model.embed_tokens.weight'}:embedding"}
    for name, values in matmuls.items():
        assert np.array_equal(back[name], values), name  # max abs error 0
    table = weights["lm_head.MatMul.weight"].T if tied else weights["model.embed_tokens.weight"]
    assert np.array_equal(back[next(n for n in back if n.endswith(":embedding"))], table)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    floats = [
        i.name
        for i in graph.graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 and i.dims[0] * i.dims[1] >= table.size
    ]
    assert not floats, f"an fp32 table is left: {floats}"
    # Float activations: 8-bit types go as two exact 4-bit planes, the kernel ONNX Runtime runs fast at float.
    bits = {a.i for n in graph.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert bits == {4}

    # ORT reads the layout as read_back does: at accuracy level 0 (float compute) the logits are the source's.
    ref, cand = Session(source), Session(out)
    tokens = ref.encode("The capital of France is Paris, and the capital of Italy is Rome.")
    np.testing.assert_allclose(cand.logits(tokens), ref.logits(tokens), rtol=1e-3, atol=1e-3)


def test_siblings_are_packed_exactly(default_checkpoint, tmp_path, monkeypatch):
    """At integer compute, MatMuls that read one input (gate and up) become one MatMulNBits and one correction, then
    a Split: each weight still reads back as the GGUF's values, and the model computes what unpacked weights do.
    (Without the GGUF kernel: where it is built, Q4_1 weights go to it instead.)"""
    import onnx

    from slmops.plugins import gguf_kernel
    from slmops.run.runtime import Session

    monkeypatch.setenv(gguf_kernel.SWITCH, "0")

    tiny = build_tiny(tmp_path / "tiny", default_checkpoint, "llama", hidden_size=256, intermediate_size=512)
    fp32 = convert.convert(str(tiny), {"precision": "fp32"}).path
    source = tmp_path / "source-fp32"
    weights = gguf_of_fp32_graph(fp32, source, "Q4_1", tmp_path / "tiny.gguf")
    request = ConvertRequest(source_dir=tiny, precision="int4", algorithm="gguf", gguf=tmp_path / "tiny.gguf")
    outputs = {}
    for packed in (True, False):
        out = outputs[packed] = tmp_path / f"packed-{packed}"
        out.mkdir()
        if not packed:
            monkeypatch.setattr(gguf_native, "_packs", lambda *_: {})
        gguf_native.GGUFNative().quantize(source, out, request)
        back = gguf_native.read_back(out)
        for name, values in weights.items():
            if not name.startswith("model.embed_tokens"):
                assert np.array_equal(back[name], values), name
    nodes = onnx.load(str(outputs[True] / "model.onnx"), load_external_data=False).graph.node
    packs = [n.doc_string for n in nodes if n.op_type == "MatMulNBits" and gguf_native.PACKED in n.doc_string]
    layers = json.loads((fp32 / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"]
    assert len(packs) == layers and all("gate_proj" in d and "up_proj" in d for d in packs)
    assert sum(n.op_type == "Split" for n in nodes) == layers
    tokens = Session(source).encode("The capital of France is Paris, and the capital of Italy is Rome.")
    np.testing.assert_allclose(
        Session(outputs[True]).logits(tokens), Session(outputs[False]).logits(tokens), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("offsets", [False, True])
def test_outlier_channels_are_multiplied_in_float(offsets, tmp_path):
    """At level 4 the integer kernel quantizes what it reads to int8 per block of 32; the outlier channels are zeroed
    there and multiplied in float by their rows of the written weights. Output = int8 product of the rest + exact
    outlier product, and the weights read back are unchanged."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from slmops.plugins import imatrix

    rng = np.random.default_rng(0)
    k, n = 96, 40
    weight = rng.standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", n])],
        [numpy_helper.from_array(weight, "W")],
    )
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)]), src / "model.onnx")
    form = imatrix.quantize_matrix(weight.T) if offsets else gguf_native.rtn8(weight.T)
    channels = np.array([70, 3, 41])  # unsorted, as calibration.outlier_channels gives them
    x = rng.standard_normal((1, 5, k)).astype(np.float32)
    x[..., channels] *= 200
    outputs = {}
    for split in (False, True):
        out = tmp_path / f"split-{split}"
        out.mkdir()
        gguf_native.write_blocks(src, out, lambda *_: [(0, n, form)], 4, {}, {"W": channels} if split else None)
        outputs[split] = ort.InferenceSession(str(out / "model.onnx")).run(None, {"x": x})[0]
        assert np.array_equal(gguf_native.read_back(out)["W"], form.dequantize().T)
    values = form.dequantize().T.astype(np.float64)
    inliers = x.astype(np.float64).copy()
    inliers[..., channels] = 0
    blocks = inliers.reshape(1, 5, -1, 32)
    step = np.abs(blocks).max(-1, keepdims=True) / 127
    int8 = (np.round(blocks / np.where(step > 0, step, 1)) * step).reshape(inliers.shape)
    expected = int8 @ values + x[..., channels].astype(np.float64) @ values[channels]
    exact = x.astype(np.float64) @ values
    assert np.abs(outputs[True] - expected).max() < 1e-3 * np.abs(exact).max()
    assert np.abs(outputs[True] - exact).max() * 10 < np.abs(outputs[False] - exact).max()
