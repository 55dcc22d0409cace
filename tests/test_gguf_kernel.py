"""The GGUF kernel (kernel/gguf_kernel.cc, the slmops-kernel wheel): it computes what llama.cpp's int8-activation dot product
computes on the GGUF's own blocks, a build that uses it holds exactly the GGUF's weights (read back from the graph),
and it runs through ONNX Runtime GenAI from the model folder alone."""

import json
import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest

from slmops.build import convert
from slmops.host import machine
from slmops.plugin.roles import ConvertRequest
from slmops.plugins import gguf_blocks, gguf_kernel, gguf_native, gptq

from .conftest import build_tiny
from .test_gguf_native import T, gguf_of_fp32_graph, random_blocks

pytestmark = pytest.mark.skipif(gguf_kernel.why_not() is not None, reason=f"no GGUF kernel: {gguf_kernel.why_not()}")


def session(
    op: str, kind: int, weight: np.ndarray, x_type: int, x_shape: list, channels=None, codes=None, threads: int = 0
):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inputs = ["x", "w"] if op == gguf_kernel.MATMUL else ["ids", "w"]
    constants = [numpy_helper.from_array(weight, "w")]
    if channels is not None:
        inputs += ["channels", "codes"]
        constants += [numpy_helper.from_array(channels, "channels"), numpy_helper.from_array(codes, "codes")]
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"], domain=gguf_kernel.DOMAIN, ggml_type=kind)],
        "g",
        [helper.make_tensor_value_info(inputs[0], x_type, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        constants,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(gguf_kernel.DOMAIN, 1)], ir_version=9
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(gguf_kernel.library()))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def int8_activations(x: np.ndarray) -> np.ndarray:
    """x as the kernel (and llama.cpp) quantizes it: int8 per block of 32 with one scale."""
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    q = np.rint(blocks * np.where(amax > 0, 127 / np.where(amax > 0, amax, 1), 0))
    return (q * (amax / 127)).reshape(x.shape)


def blocks_of(kind: str, rows: int, cols: int, rng) -> tuple[gguf_blocks.BlockForm, np.ndarray, int]:
    """A random weight of a kernel type: its block form, its values and its bytes in that type."""
    if kind == "Q6_0":  # slmops's own 6-bit form: no GGUF type to read it from, gptq makes it
        form = gptq.rounded(rng.laplace(0, 0.02, (rows, cols)).astype(np.float32), None, "q6_0")
        assert form.codes.max() == 63 and form.codes.min() == 0  # every code the two high bits can hold is used
        return form, form.dequantize(), rows * cols * 26 // 32
    raw = random_blocks(kind, rows, cols, rng)
    values = gguf.quants.dequantize(raw, T[kind])
    return gguf_blocks.block_form(kind, raw, values), values, raw.nbytes


# Bytes the kernel's layout adds per row and super-block of 256: Q4_K and Q5_K hold their 6-bit sub-block scales and
# minimums a byte each (16 bytes where the GGUF packs 12); every other type keeps the GGUF's own bytes.
EXTRA_PER_SUPER_BLOCK = {"Q4_K": 4, "Q5_K": 4}


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_kernel_computes_the_int8_product_of_the_gguf_blocks(kind):
    from onnx import TensorProto

    rng = np.random.default_rng(0)
    # 9 groups of 8 outputs; 5 blocks, or (K-quants) 2 super-blocks of 256
    rows, cols = 72, 512 if kind.endswith("_K") else 160
    form, values, size = blocks_of(kind, rows, cols, rng)
    ggml = gguf_kernel.ggml_type(form)
    assert ggml == getattr(gguf_kernel, kind)  # each type held as itself: Q4_0 and Q5_0 without a minimum
    weight = gguf_kernel.grouped(form, ggml)
    assert weight.nbytes == size + rows * cols // 256 * EXTRA_PER_SUPER_BLOCK.get(kind, 0)  # Q6_0: 26 bytes per 32
    back = gguf_kernel.form_of(weight, ggml)
    assert np.array_equal(back.dequantize(), values)  # the layout holds the GGUF's values exactly

    x = rng.standard_normal((2, 3, cols)).astype(np.float32)
    x[..., [7, 40, 41]] *= 40  # outlier channels: each sets its block's int8 scale
    y = session(gguf_kernel.MATMUL, ggml, weight, TensorProto.FLOAT, [2, 3, cols]).run(None, {"x": x})[0]
    assert y.shape == (2, 3, rows)
    expected = int8_activations(x) @ values.T  # the GGUF's weights times int8 x, the minimum included
    scale = np.abs(x @ values.T).max()
    np.testing.assert_allclose(y, expected, atol=2e-5 * scale, rtol=0)
    assert np.abs(y - x @ values.T).max() > 1e-4 * scale  # int8 activations, not float: the emulation is the claim

    # With outlier channels: those are zero in what is quantized and multiplied in float by their exact weights.
    channels = np.array([7, 40, 41] + ([300] if cols > 300 else []) + [cols - 1])  # sorted
    codes = gguf_kernel.outlier_codes(back, ggml, channels)
    y = session(gguf_kernel.MATMUL, ggml, weight, TensorProto.FLOAT, [2, 3, cols], channels, codes).run(None, {"x": x})[
        0
    ]
    inliers = x.copy()
    inliers[..., channels] = 0
    expected = int8_activations(inliers) @ values.T + x[..., channels] @ values[:, channels].T
    np.testing.assert_allclose(y, expected, atol=2e-5 * scale, rtol=0)
    assert np.abs(y - x @ values.T).max() < np.abs(int8_activations(x) @ values.T - x @ values.T).max() / 4

    ids = np.array([[0, 71, 8], [9, 9, 40]], dtype=np.int64)
    rows_out = session(gguf_kernel.GATHER, ggml, weight, TensorProto.INT64, [2, 3]).run(None, {"ids": ids})[0]
    assert np.array_equal(rows_out, values[ids])  # bit for bit: a tied embedding reads these


def test_a_form_it_cannot_hold_exactly_is_refused():
    rng = np.random.default_rng(0)
    raw = random_blocks("Q4_K", 8, 256, rng)
    form = gguf_blocks.block_form("Q4_K", raw, gguf.quants.dequantize(raw, T["Q4_K"]))
    assert gguf_kernel.ggml_type(form) == gguf_kernel.Q4_K
    form.k = None  # the same values without the GGUF's two-level scales: d x sc needs more than a fp16 scale
    assert gguf_kernel.ggml_type(form) is None
    for kind, rows in (("Q4_1", 12), ("Q6_K", 12)):  # 12 outputs: not whole groups of 8
        raw = random_blocks(kind, rows, 256, rng)
        assert gguf_kernel.ggml_type(gguf_blocks.block_form(kind, raw, gguf.quants.dequantize(raw, T[kind]))) is None


@pytest.mark.parametrize("kind,tied", [("Q4_1", True), ("Q4_0", False), ("Q4_K", False), ("Q6_K", True)])
def test_a_build_with_the_kernel_is_exact_and_runs_from_its_folder(kind, tied, default_checkpoint, tmp_path):
    """At integer compute (the default) every MatMul of a type the kernel holds becomes MatMulGGML with its outlier channels and no
    float correction; read back from the graph the weights are the GGUF's; ORT GenAI loads the library the folder
    carries and the logits stay close to the source's (int8 activations); decoding step by step gives the prompt's
    logits (the kernel's attention on its fp16 cache)."""
    import onnx

    from slmops.run.runtime import Session

    tiny = build_tiny(
        tmp_path / "tiny", default_checkpoint, "llama", hidden_size=256, intermediate_size=512, tie_word_embeddings=tied
    )
    fp32 = convert.convert(str(tiny), {"precision": "fp32"}).path
    source = tmp_path / "source-fp32"
    weights = gguf_of_fp32_graph(fp32, source, kind, tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    out.mkdir()
    request = ConvertRequest(source_dir=tiny, precision="int4", algorithm="gguf", gguf=tmp_path / "tiny.gguf")
    gguf_native.GGUFNative().quantize(source, out, request)

    report = json.loads((out / gguf_native.REPORT).read_text())
    assert report["kernel"] == gguf_kernel.LIBRARY and set(report["exact"]) == {kind}
    nodes = onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
    ops = {n.op_type for n in nodes}
    matmuls = {n: v for n, v in weights.items() if not n.startswith("model.embed_tokens")}
    kernel_nodes = [n for n in nodes if n.op_type == gguf_kernel.MATMUL]
    assert len(kernel_nodes) == len(matmuls) and all(len(n.input) == 4 for n in kernel_nodes)  # with float channels
    assert not ops & {"MatMulNBits", "MatMul"}, "a MatMulNBits or a float correction is left"
    assert (gguf_kernel.GATHER in ops) == tied
    back = gguf_native.read_back(out)
    for name, values in matmuls.items():
        assert np.array_equal(back[name], values), name
    if tied:
        assert np.array_equal(back["lm_head.MatMul.weight:embedding"], weights["lm_head.MatMul.weight"].T)

    options = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert options["custom_ops_library"] == gguf_kernel.LIBRARY and (out / gguf_kernel.LIBRARY).is_file()
    ref, cand = Session(source), Session(out)
    tokens = ref.encode("The capital of France is Paris, and the capital of Italy is Rome.")
    a, b = ref.logits(tokens), cand.logits(tokens)
    assert np.abs(a - b).max() < 0.02 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9
    # attention is the kernel's too, its cache fp16: the prompt in parts after a past (as a chat's next turn), then
    # token by token (decoding: one row a call), on ORT GenAI's shared cache, gives the logits of the whole at once
    assert gguf_kernel.ATTENTION in ops and "GroupQueryAttention" not in ops and report["kv_cache"] == "fp16"
    steps, rows = cand.generator(len(tokens) + 1), []
    for part in [tokens[:3], tokens[3:7], *([t] for t in tokens[7:])]:
        steps.append_tokens(part)
        rows.append(np.asarray(steps.get_output("logits"))[0])
    assert np.abs(np.concatenate(rows) - b).max() <= 1e-5 * np.abs(b).max()


def test_without_the_kernel_the_graph_is_portable(default_checkpoint, tmp_path, monkeypatch):
    """SLMOPS_GGUF_KERNEL=0 (as where no compiler or no AVX2 is found): MatMulNBits with float corrections, no
    library in the folder, the same weights."""
    import onnx

    monkeypatch.setenv(gguf_kernel.SWITCH, "0")
    tiny = build_tiny(tmp_path / "tiny", default_checkpoint, "llama", hidden_size=256, intermediate_size=512)
    fp32 = convert.convert(str(tiny), {"precision": "fp32"}).path
    source = tmp_path / "source-fp32"
    weights = gguf_of_fp32_graph(fp32, source, "Q4_1", tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    out.mkdir()
    request = ConvertRequest(source_dir=tiny, precision="int4", algorithm="gguf", gguf=tmp_path / "tiny.gguf")
    gguf_native.GGUFNative().quantize(source, out, request)
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and gguf_kernel.MATMUL not in ops
    assert not (out / gguf_kernel.LIBRARY).exists()
    assert "custom_ops_library" not in json.loads((out / "genai_config.json").read_text())["model"]["decoder"].get(
        "session_options", {}
    )
    assert json.loads((out / gguf_native.REPORT).read_text())["kernel"] == f"{gguf_kernel.SWITCH}=0"
    back = gguf_native.read_back(out)
    for name, values in weights.items():
        if not name.startswith("model.embed_tokens"):
            assert np.array_equal(back[name], values), name


def test_a_build_with_the_kernel_is_not_reused_without_it(monkeypatch, default_checkpoint):
    """The cache key holds what the graph will be: SLMOPS_GGUF_KERNEL=0 (a folder to deploy where the kernel cannot
    run) does not get the kernel build back from the cache."""
    from slmops.build import sources
    from slmops.plugin import provided

    gguf_native_plugin = next(q for q in provided.quantizers() if q.name == "gguf-native")
    builder = next(c for c in provided.converters() if c.name == "model-builder")
    request = ConvertRequest(
        source_dir=default_checkpoint, precision="int4", algorithm="gguf", gguf=sources.default_gguf()
    )
    with_kernel = convert.build_key("sha", request, builder, gguf_native_plugin)
    monkeypatch.setenv(gguf_kernel.SWITCH, "0")
    assert convert.build_key("sha", request, builder, gguf_native_plugin) != with_kernel
    assert gguf_native_plugin.graph_facts(request) == {"ops": ["MatMulNBits"]}


def test_one_session_run_from_several_threads_at_once():
    """ONNX Runtime lets several threads run one session (slmops serve does): each call quantizes x into its own
    buffers and shares the kernel's threads, so every answer is the one it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    from onnx import TensorProto

    rng = np.random.default_rng(2)
    raw = random_blocks("Q4_1", 64, 256, rng)
    form = gguf_blocks.block_form("Q4_1", raw, gguf.quants.dequantize(raw, T["Q4_1"]))
    run = session(
        gguf_kernel.MATMUL,
        gguf_kernel.Q4_1,
        gguf_kernel.grouped(form, gguf_kernel.Q4_1),
        TensorProto.FLOAT,
        [1, None, 256],
    )
    xs = [rng.standard_normal((1, 1 + i % 5, 256)).astype(np.float32) for i in range(64)]
    alone = [run.run(None, {"x": x})[0] for x in xs]
    for _ in range(3):
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda x: run.run(None, {"x": x})[0], xs))
        for a, b in zip(alone, together, strict=True):
            assert np.array_equal(a, b)


def test_the_kernel_runs_on_onnx_runtimes_threads_and_starts_none():
    """Its work is handed out on ONNX Runtime's intra-op pool: any thread count gives the same products, and a process
    running the kernel on one intra-op thread has no more threads than one running a plain ONNX Runtime MatMul (the
    kernel's own pool once ignored the session's setting and the CPUs the process may use)."""
    from onnx import TensorProto

    rng = np.random.default_rng(3)
    raw = random_blocks("Q5_0", 96, 320, rng)
    form = gguf_blocks.block_form("Q5_0", raw, gguf.quants.dequantize(raw, T["Q5_0"]))
    weight = gguf_kernel.grouped(form, gguf_kernel.Q5_0)
    x = rng.standard_normal((1, 7, 320)).astype(np.float32)
    answers = [
        session(gguf_kernel.MATMUL, gguf_kernel.Q5_0, weight, TensorProto.FLOAT, [1, 7, 320], threads=t).run(
            None, {"x": x}
        )[0]
        for t in (1, 2, 5)
    ]
    assert all(np.array_equal(answers[0], a) for a in answers[1:])

    child = textwrap.dedent("""
        import sys
        import numpy as np, onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
        kernel = sys.argv[1] == "kernel"
        w = numpy_helper.from_array(np.zeros((8, 1, 144) if kernel else (32, 8), np.uint8 if kernel else np.float32), "w")
        node = helper.make_node("MatMulGGML", ["x", "w"], ["y"], domain="ai.slmops", ggml_type=2) if kernel \
            else helper.make_node("MatMul", ["x", "w"], ["y"])
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.slmops", 1)],
                                  ir_version=9)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        if kernel:
            options.register_custom_ops_library(sys.argv[2])
        s = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for _ in range(3):
            s.run(None, {"x": np.ones((1, 32), np.float32)})
        print(next(line for line in open("/proc/self/status") if line.startswith("Threads:")).split()[1])
    """)
    counts = [
        subprocess.run(
            [sys.executable, "-c", child, which, str(gguf_kernel.library())], capture_output=True, text=True, check=True
        ).stdout
        for which in ("kernel", "plain")
    ]
    assert int(counts[0]) == int(counts[1]), counts


def test_the_portable_target_carries_no_native_code(tiny_llama, cli_here):
    """--target portable: the same route without the kernel (MatMulNBits), no library, nothing a machine must have;
    another build than the native one, and convert says which target it built for."""
    native = convert.convert(str(tiny_llama), {"precision": "int8"})
    portable = convert.convert(str(tiny_llama), {"precision": "int8", "target": "portable"})
    assert native.path != portable.path and native.manifest["quantizer"] == portable.manifest["quantizer"] == "q8_0"
    assert (native.path / gguf_kernel.LIBRARY).is_file() and native.manifest["requires"]
    assert not (portable.path / gguf_kernel.LIBRARY).exists() and not portable.manifest.get("requires")
    assert not list(portable.path.glob("*.so")) and portable.verification["graph"]["ops"].get("MatMulNBits")
    assert json.loads((portable.path / gguf_native.REPORT).read_text())["kernel"] == "target portable: no native code"
    r = cli_here("convert", tiny_llama, "--precision", "int8", "--target", "portable")
    assert r.rc == 0 and "portable: no native code, runs wherever ONNX Runtime GenAI runs" in r.out, r
    bad = cli_here("convert", tiny_llama, "--precision", "int8", "--target", "arm")
    assert bad.rc == 2 and "Invalid value for '--target'" in bad.err and "linux-aarch64" in bad.err

    # A named target: native code where it is this machine's platform, the portable graph for another one.
    other = next(t for t in machine.NAMED_TARGETS if t != machine.this_target())
    foreign = convert.convert(str(tiny_llama), {"precision": "int8", "target": other})
    assert not foreign.manifest.get("requires") and not list(foreign.path.glob("*.so"))
    assert foreign.manifest["options"]["target"] == other and foreign.path not in (native.path, portable.path)
    own = convert.convert(str(tiny_llama), {"precision": "int8", "target": machine.this_target()})
    assert (own.path / gguf_kernel.LIBRARY).is_file() and own.manifest["requires"] == native.manifest["requires"]


def attention_session(kernel: bool, packed: bool, rotary: bool, interleaved: bool, heads: int, kv_heads: int):
    """One GroupQueryAttention node: ONNX Runtime's (fp32 cache) or the kernel's (fp16 cache)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    names = ["q", "" if packed else "k", "" if packed else "v", "pk", "pv", "seqlens", "total"]
    names += ["cos", "sin"] if rotary else []
    op, domain = (gguf_kernel.ATTENTION, gguf_kernel.DOMAIN) if kernel else ("GroupQueryAttention", "com.microsoft")
    node = helper.make_node(
        op,
        names,
        ["o", "present_k", "present_v"],
        domain=domain,
        num_heads=heads,
        kv_num_heads=kv_heads,
        do_rotary=int(rotary),
        rotary_interleaved=int(interleaved),
    )
    cache = TensorProto.FLOAT16 if kernel else TensorProto.FLOAT
    typed = {"seqlens": TensorProto.INT32, "total": TensorProto.INT32, "pk": cache, "pv": cache}
    inputs = [helper.make_tensor_value_info(n, typed.get(n, TensorProto.FLOAT), None) for n in names if n]
    outputs = [
        helper.make_tensor_value_info(n, t, None) for n, t in (("o", 1), ("present_k", cache), ("present_v", cache))
    ]
    model = helper.make_model(
        helper.make_graph([node], "g", inputs, outputs),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)],
        ir_version=9,
    )
    options = ort.SessionOptions()
    if kernel:
        options.register_custom_ops_library(str(gguf_kernel.library()))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    "packed,rotary,interleaved", [(True, True, False), (True, True, True), (False, True, False), (True, False, False)]
)
def test_the_kernels_attention_computes_onnx_runtimes_with_an_fp16_cache(packed, rotary, interleaved):
    """The kernel's GroupQueryAttentionF16KV against ONNX Runtime's GroupQueryAttention on the same inputs (its past
    cache the same fp16 values): a first prompt, a batch of two prompts one padded, decoding steps of a batch whose
    rows have different lengths, a prompt after a past; RoPE over the whole head or (unpacked) its first half. The
    present cache holds ONNX Runtime's present rounded to fp16 (within a step of fp16: its RoPE fuses where ours
    does not) where the row is valid; the output differs by that rounding alone."""
    heads, kv_heads, size = 6, 2, 64
    rope = size if packed else size // 2
    ours, theirs = (attention_session(k, packed, rotary, interleaved, heads, kv_heads) for k in (True, False))
    rng = np.random.default_rng(1)
    cos, sin = (rng.standard_normal((40, rope // 2)).astype(np.float32) for _ in range(2))
    for batch, rows, past, lengths in ((1, 7, 0, [7]), (2, 9, 0, [9, 5]), (2, 1, 12, [12, 7]), (1, 4, 6, [10])):
        total = rows if past == 0 else max(lengths)
        cache = [rng.standard_normal((batch, kv_heads, past, size)).astype(np.float16) for _ in range(2)]
        width = (heads + 2 * kv_heads) * size if packed else heads * size
        feeds = {
            "q": rng.standard_normal((batch, rows, width)).astype(np.float32),
            "seqlens": np.array([n - 1 for n in lengths], np.int32),
            "total": np.array([total], np.int32),
        }
        if not packed:
            feeds |= {x: rng.standard_normal((batch, rows, kv_heads * size)).astype(np.float32) for x in "kv"}
        if rotary:
            feeds |= {"cos": cos, "sin": sin}
        got = ours.run(None, {**feeds, "pk": cache[0], "pv": cache[1]})
        want = theirs.run(None, {**feeds, "pk": cache[0].astype(np.float32), "pv": cache[1].astype(np.float32)})
        assert got[1].dtype == np.float16 and got[1].shape == want[1].shape
        for b, n in enumerate(lengths):
            valid = min(rows, n) if past == 0 else rows  # a padded prompt's rows past its length are padding
            for mine, reference in ((got[1][b, :, :n], want[1][b, :, :n]), (got[2][b, :, :n], want[2][b, :, :n])):
                step = np.spacing(np.abs(reference).astype(np.float16)).astype(np.float32)
                assert (np.abs(mine.astype(np.float32) - reference) <= step).all(), (batch, rows, b)
            scale = np.abs(want[0][b, :valid]).max()
            assert np.abs(got[0][b, :valid] - want[0][b, :valid]).max() < 4e-3 * scale, (batch, rows, b)


def test_a_graph_whose_attention_the_kernel_does_not_compute_keeps_onnx_runtimes():
    """swap_attention is all or none: one node with a sliding window keeps every node ONNX Runtime's and the cache
    fp32; without it every node is the kernel's and the cache inputs and outputs are fp16."""
    from onnx import TensorProto, helper

    def graph(window: int):
        nodes = [
            helper.make_node(
                "GroupQueryAttention",
                ["q", "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "s", "t", "", "", "", "", ""],
                [f"o{i}", f"present.{i}.key", f"present.{i}.value"],
                domain="com.microsoft",
                num_heads=2,
                kv_num_heads=1,
                local_window_size=window if i else -1,
            )
            for i in range(2)
        ]
        kv = [f"{p}.{i}.{x}" for p in ("past_key_values",) for i in range(2) for x in ("key", "value")]
        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ["q", *kv]]
        outputs = [
            helper.make_tensor_value_info(f"present.{i}.{x}", TensorProto.FLOAT, None)
            for i in range(2)
            for x in ("key", "value")
        ]
        return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs))

    windowed = graph(4)
    assert gguf_kernel.swap_attention(windowed) == 0
    assert {n.op_type for n in windowed.graph.node} == {"GroupQueryAttention"}
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in windowed.graph.output)
    plain = graph(-1)
    assert gguf_kernel.swap_attention(plain) == 2
    assert {(n.op_type, n.domain, len(n.input)) for n in plain.graph.node} == {(gguf_kernel.ATTENTION, "ai.slmops", 7)}
    assert all(
        v.type.tensor_type.elem_type == TensorProto.FLOAT16 for v in [*plain.graph.input[1:], *plain.graph.output]
    )


@pytest.mark.parametrize("heads,kv_heads,width", [(4, 0, 384), (4, 3, 640), (2, 1, 60), (2, 1, 200)])
def test_the_kernels_attention_makes_no_output_from_shapes_onnx_runtime_refuses(heads, kv_heads, width):
    """No kv head, heads not a multiple of the kv heads, a head size not a multiple of 8, a width that is no whole
    number of heads: the node makes no output (ONNX Runtime's own would refuse), rather than reading past a tensor."""
    session = attention_session(True, True, False, False, heads, kv_heads)
    feeds = {"q": np.ones((1, 1, width), np.float32), "seqlens": np.zeros(1, np.int32), "total": np.ones(1, np.int32)}
    cache = np.zeros((1, max(kv_heads, 1), 0, 64), np.float16)
    assert session.run(None, {**feeds, "pk": cache, "pv": cache}) == [None, None, None]
