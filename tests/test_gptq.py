"""gptq, the int4 of a float source: error-compensating rounding lowers the output error of plain rounding, the bits
go where the measured error is within llama.cpp Q4_K_M's bytes, the graph holds exactly the blocks the fit chose,
`convert --precision int4` takes it for a float source (and a GGUF's own blocks for a GGUF), and the user's own
calibration text changes the build key and what is measured."""

import json

import numpy as np
import pytest

from slmops.build import convert
from slmops.errors import SlmopsError
from slmops.measure import quality
from slmops.plugins import calibration, gguf_kernel, gguf_native, gptq

from .conftest import run_inprocess


def correlated(rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A heavy-tailed weight and the H = E[x x^T] of inputs with correlated channels and a few loud ones, as a
    trained model's are (GPTQ gains from the correlation; an identity H leaves nothing to compensate)."""
    rng = np.random.default_rng(seed)
    matrix = rng.laplace(0, 0.02, (rows, cols)).astype(np.float32)
    mix = rng.standard_normal((cols, cols)) / np.sqrt(cols) + np.eye(cols)
    x = rng.standard_normal((4 * cols, cols)) @ mix
    x[:, rng.choice(cols, 4, replace=False)] *= 8
    return matrix, x.T @ x / len(x)


KERNEL_TYPE = {
    "q4_0": gguf_kernel.Q4_0,
    "q4_1": gguf_kernel.Q4_1,
    "q5_0": gguf_kernel.Q5_0,
    "q5_1": gguf_kernel.Q5_1,
    "q6_0": gguf_kernel.Q6_0,
}


@pytest.mark.parametrize("form", list(KERNEL_TYPE))
def test_error_compensation_lowers_the_output_error_of_plain_rounding(form):
    matrix, h = correlated(64, 256)
    plain = gptq.rounded(matrix, np.diag(h), form)
    compensated = gptq.gptq(matrix, h, form)
    bits = gptq.FORMS[form][0]
    assert compensated.codes.max() == 2**bits - 1 and compensated.codes.shape == matrix.shape
    # fp16 scale (and minimum): what the kernel holds exactly, in llama.cpp's form of that name
    assert gguf_kernel.ggml_type(compensated) == KERNEL_TYPE[form]
    before = gptq.output_error(matrix, plain.dequantize(), h)
    after = gptq.output_error(matrix, compensated.dequantize(), h)
    assert after < 0.85 * before
    # a bit more holds about a quarter of the error
    if bits > 4:
        fewer = {"q5_0": "q4_0", "q5_1": "q4_1", "q6_0": "q5_0"}[form]
        assert after < 0.5 * gptq.output_error(matrix, gptq.gptq(matrix, h, fewer).dequantize(), h)


def test_the_symmetric_fit_beats_the_largest_value_on_the_lowest_code():
    """q4_0 / q5_0 scales searched under the importance (llama.cpp's make_qx_quants) against Q4_0's plain rule
    (scale = the largest value / -8): less weighted error; the plain rule is among the candidates, so never more."""
    matrix, h = correlated(64, 256, seed=3)
    blocks = matrix.reshape(64, -1, 32)
    w = gptq.fit_weights(blocks, np.diag(h))
    big = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
    for form, centre in (("q4_0", 8), ("q5_0", 16), ("q6_0", 32)):
        plain = big / -centre
        codes = np.clip(np.rint(blocks / plain), -centre, centre - 1)
        plain_error = (w * (plain * codes - blocks) ** 2).sum()
        fitted = gptq.rounded(matrix, np.diag(h), form).dequantize().reshape(blocks.shape)
        error = (w * (fitted - blocks) ** 2).sum()
        assert error < 0.95 * plain_error, form


def test_importance_weighs_the_block_fit():
    matrix, h = correlated(64, 256, seed=1)
    weighted = gptq.rounded(matrix, np.diag(h), "q4_1")
    flat = gptq.rounded(matrix, np.ones(256), "q4_1")
    assert gptq.output_error(matrix, weighted.dequantize(), h) < gptq.output_error(matrix, flat.dequantize(), h)


def test_each_fit_is_the_least_weighted_error_of_its_candidate_grids():
    """The fits read the error off the least-squares sums (sum(w x^2) less what the fit explains) instead of
    rounding every candidate back: the grid they keep is the one whose error, computed the long way, is least (to
    float32's rounding of those sums: a millionth of sum(w x^2))."""
    from slmops.plugins import imatrix

    matrix, h = correlated(64, 256, seed=5)
    x = matrix.reshape(64, -1, 32)
    w = gptq.fit_weights(x, np.diag(h))

    def least_squares(codes, with_minimum):  # the fit of fixed codes, and its weighted error, the long way
        a = np.stack([codes, np.ones_like(codes)] if with_minimum else [codes], -1) * np.sqrt(w)[..., None]
        fit = np.einsum("...ij,...jk->...ik", np.linalg.pinv(a), (np.sqrt(w) * x)[..., None])[..., 0]
        error = (w * (np.einsum("...ij,...j->...i", a / np.sqrt(w)[..., None], fit) - x) ** 2).sum(-1)
        return fit, error

    big = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)
    slack = 1e-6 * (w * x * x).sum(-1)
    for zero in (8, 16):
        fits = [
            least_squares(np.clip(np.rint(-x * (zero + 0.1 * step) / big), -zero, zero - 1), False)
            for step in range(-9, 10)
        ]
        scales, errors = np.stack([f[0][..., 0] for f in fits]), np.stack([f[1] for f in fits])
        kept = np.abs(scales - gptq.symmetric_scale(x, w, zero)).argmin(0)  # the grid whose scale it returned
        assert (np.take_along_axis(errors, kept[None], 0)[0] <= errors.min(0) + slack).all(), zero
    codes, scale, low = imatrix.search_blocks(x, w, 15)
    kept = (w * (scale[..., None] * codes + low[..., None] - x) ** 2).sum(-1)
    first = least_squares(codes.astype(np.float64), True)[1]  # the kept codes' own fit: no better scale and min
    assert np.allclose(kept, first, rtol=1e-4, atol=1e-12)
    span = x.max(-1) - x.min(-1)
    for step in range(21):  # nor does any first-round candidate grid fit better
        grid = np.clip(np.rint((x - x.min(-1, keepdims=True)) * ((14 + 0.1 * step) / span)[..., None]), 0, 15)
        assert (kept <= least_squares(grid, True)[1] + slack).all(), step


def test_the_error_spread_is_the_cholesky_factor_of_the_inverse_of_h():
    """GPTQ's U (H^-1 = U^T U, upper) from H's own factor by a triangular inverse in halves, not by inverting H."""
    _, h = correlated(8, 300, seed=4)  # 300 wide: halves of halves down to 128
    h = h + 0.1 * np.diag(h).mean() * np.eye(300)
    u = gptq.error_spread(h)
    assert np.array_equal(u, np.triu(u)) and (np.diag(u) > 0).all()
    assert np.allclose(u, np.linalg.cholesky(np.linalg.inv(h)).T, rtol=1e-9, atol=1e-12)


def test_the_blocks_do_not_depend_on_how_many_cpus_the_process_may_use(monkeypatch):
    """Rows are fitted and rounded in runs, one per CPU allowed: one CPU or four, the same codes, scales and minimums
    (and with one CPU, no thread is started)."""
    import threading

    from slmops.host import cpus
    from slmops.plugins import imatrix

    matrix, h = correlated(256, 128, seed=2)
    monkeypatch.setattr(gptq, "GPTQ_RUN", 64)  # runs of rows as an output layer's are, on a small matrix

    def blocks(allowed):
        monkeypatch.setattr(cpus, "allowed_cpus", lambda: allowed)
        started = threading.active_count()
        forms = [gptq.rounded(matrix, np.diag(h), "q4_1"), gptq.gptq(matrix, h, "q5_0")]
        forms.append(imatrix.quantize_matrix(matrix, 32, np.diag(h)))
        return forms, threading.active_count() - started

    (one, extra), (four, _) = blocks(1), blocks(4)
    assert extra == 0
    for a, b in zip(one, four, strict=True):
        assert np.array_equal(a.codes, b.codes) and np.array_equal(a.scales, b.scales)
        assert (a.offsets is None and b.offsets is None) or np.array_equal(a.offsets, b.offsets)
    assert cpus.row_slices(256, 4, least=64) == [slice(0, 64), slice(64, 128), slice(128, 192), slice(192, 256)]
    assert cpus.row_slices(100, 4, least=64) == [slice(0, 100)]
    assert cpus.row_slices(0, 4) == [slice(0, 0)]  # an empty weight is one (empty) run, not none
    assert cpus.row_slices(10_000, 2, most=4096) == [slice(0, 3333), slice(3333, 6667), slice(6667, 10_000)]


def test_allocation_spends_the_budget_where_the_error_is():
    sizes = {"a": 1000, "b": 1000, "c": 4000}
    errors = {
        "a": {
            "q4_0": 0.12,
            "q4_1": 0.10,
            "q5_0": 0.035,
            "q5_1": 0.03,
            "q6_0": 0.009,
            "q8_0": 0.001,
        },  # loud: worth 5 bits, then 8
        "b": {"q4_0": 0.012, "q4_1": 0.01, "q5_0": 0.0045, "q5_1": 0.004, "q6_0": 0.001, "q8_0": 0.0001},
        "c": {"q4_0": 0.025, "q4_1": 0.02, "q5_0": 0.007, "q5_1": 0.006, "q6_0": 0.0015, "q8_0": 0.0002},
    }
    smallest = {"a": "q4_0", "b": "q4_0", "c": "q4_0"}
    base = sum(n * gptq.BYTES["q4_0"] for n in sizes.values())
    assert gptq.allocate(errors, sizes, base) == smallest
    one_upgrade = base + 1000 * (gptq.BYTES["q5_0"] - gptq.BYTES["q4_0"])
    assert gptq.allocate(errors, sizes, one_upgrade) == {**smallest, "a": "q5_0"}  # the most error per byte
    chosen = gptq.allocate(errors, sizes, base * 1.2)
    used = sum(sizes[n] * gptq.BYTES[f] for n, f in chosen.items())
    assert used <= base * 1.2 and chosen["a"] == "q8_0"  # through q5_0 and q6_0, each the most error per byte
    assert chosen["c"] == "q4_0"  # its next bit costs 4x the bytes for less error
    assert gptq.allocate(errors, sizes, base * 10) == {"a": "q8_0", "b": "q8_0", "c": "q8_0"}
    # a floor is kept whatever the errors say
    floored = gptq.allocate(errors, sizes, base * 2, floor={"b": "q5_0"})
    assert gptq.BYTES[floored["b"]] >= gptq.BYTES["q5_0"]


def test_budget_is_what_llama_cpp_q4_k_m_or_q5_k_m_gives_each_weight():
    mb = lambda name, rows, cols: gptq.recipe_bytes(name, rows, cols, 30) / (rows * cols)  # noqa: E731
    assert mb("model.layers.10.mlp.down_proj.MatMul.weight", 576, 1536) == 144 / 256  # Q4_K: 1536 = 6 x 256
    assert mb("model.layers.0.mlp.down_proj.MatMul.weight", 576, 1536) == 210 / 256  # use_more_bits: Q6_K
    assert mb("model.layers.10.mlp.up_proj.MatMul.weight", 1536, 576) == 22 / 32  # 576 rows: Q4_K falls back to Q5_0
    assert mb("model.layers.0.attn.v_proj.MatMul.weight", 192, 576) == 34 / 32  # Q6_K falls back to Q8_0
    assert mb("lm_head.MatMul.weight", 49152, 2048) == 210 / 256  # the output layer: Q6_K
    q5 = lambda name, rows, cols: gptq.recipe_bytes(name, rows, cols, 30, "Q5_K_M") / (rows * cols)  # noqa: E731
    assert q5("model.layers.10.mlp.down_proj.MatMul.weight", 576, 1536) == 176 / 256  # Q5_K_M: Q5_K
    assert q5("model.layers.10.mlp.up_proj.MatMul.weight", 1536, 576) == 24 / 32  # Q5_K falls back to Q5_1
    assert q5("model.layers.0.mlp.down_proj.MatMul.weight", 576, 1536) == 210 / 256  # use_more_bits: Q6_K
    parts = gptq.split_qkv("model.layers.3.attn.qkv_proj.MatMul.weight", 960, {
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_size": 64})  # fmt: skip
    assert [p[1:] for p in parts] == [(0, 576), (576, 768), (768, 960)] and parts[2][0].endswith("v_proj.MatMul.weight")


def test_gptq_build_holds_the_chosen_blocks_within_the_budget(tiny_qwen2):
    build = convert.convert(str(tiny_qwen2), {"precision": "int4", "algorithm": "gptq"})
    assert build.manifest["quantizer"] == "gptq" and build.verification["ok"]
    fp32 = convert.reference(str(tiny_qwen2), {}).path
    report = json.loads((build.path / gguf_native.REPORT).read_text())
    # within the budget, unless even the least bits are over it (the tiny model: a 49k-row lm_head and a 3.5 MB
    # tokenizer around 64-wide layers)
    assert report["bytes"] <= max(report["budget_bytes"], report["floor_bytes"])
    assert set(report["forms"].values()) <= set(gptq.CHOICES)
    # the output layer by use (the default): in parts of 4096 vocabulary rows, each with its form
    head = [n for n in report["forms"] if n.startswith("lm_head.MatMul.weight" + gptq.HEAD_PART)]
    assert len(head) == -(-49152 // gptq.HEAD_ROWS) and "lm_head.MatMul.weight" not in report["forms"]
    # The graph computes with exactly the blocks the fit chose: rebuilt here from the same measurements.
    hessians, use = calibration.statistics_and_use(fp32)
    decoder = json.loads((fp32 / "genai_config.json").read_text())["model"]["decoder"]
    plan = gptq.Plan(decoder, use=use)
    plan.chosen = report["forms"]
    matrices = gptq.weights_of(fp32)
    back = gguf_native.read_back(build.path)
    for name, matrix in matrices.items():
        runs = plan.forms(name, matrix, hessians.get(name))
        expected = np.concatenate([form.dequantize() for _, _, form in runs])
        held = back[f"{name}:embedding"] if name in back_tables(back) else back[name].T
        assert np.array_equal(held, expected), name
    if gguf_kernel.library():  # every weight in the kernel, every form, packed q/k/v of mixed forms included
        assert build.verification["graph"]["matmul_nbits"] == {}
    # Closer to the source than what `convert --precision int4` gave a float source before (the builder's RTN), both
    # on float activations (the weights alone). Not held against imatrix here: on this model the 49k-row lm_head is
    # most of the weights, and imatrix keeps it at 8 bits where gptq's budget (the tokenizer alone is over it) leaves 5.
    floats = {"precision": "int4", "accuracy_level": 1}
    ours = convert.convert(str(tiny_qwen2), {**floats, "algorithm": "gptq"})
    rtn = convert.convert(str(tiny_qwen2), {**floats, "algorithm": "rtn"})
    assert quality.compare(ours.path, fp32).mean_kld < quality.compare(rtn.path, fp32).mean_kld


def test_h_takes_16_tokens_a_column_of_the_widest_input_within_bounds():
    """SmolLM2-135M (widest input 1536) and every larger model take all 24,576 tokens; a narrow model fewer, never
    under the 4,096 of the other statistics."""
    from onnx import TensorProto, helper

    def graph(widths: list[int]):
        weights = [
            helper.make_tensor(f"w{i}", TensorProto.FLOAT, [k, 8], np.zeros(k * 8)) for i, k in enumerate(widths)
        ]
        matmuls = [helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"]) for i in range(len(widths))]
        return helper.make_model(helper.make_graph(matmuls, "g", [], [], weights))

    assert calibration.hessian_tokens(graph([576, 1536, 576])) == calibration.HESSIAN_TOKENS == 24576
    assert calibration.hessian_tokens(graph([1536, 8960])) == calibration.HESSIAN_TOKENS
    assert calibration.hessian_tokens(graph([512, 576])) == 16 * 576
    assert calibration.hessian_tokens(graph([64, 128])) == calibration.CALIBRATION_TOKENS


def test_token_use_is_the_mean_next_token_probability(tiny_qwen2):
    """token_use (computed in place, as one product per window) equals each position's softmax averaged in float64,
    over more than one window."""
    import onnx

    fp32 = convert.reference(str(tiny_qwen2), {}).path
    text = " ".join(f"item {i} costs {i * 7 % 100} euros;" for i in range(250))
    model = onnx.load(str(fp32 / "model.onnx"), load_external_data=False)
    limit = calibration.hessian_tokens(model)
    assert len(calibration.calibration_tokens(fp32, text, limit)) > 2 * calibration.WINDOW
    use = calibration.token_use(fp32, text)
    windows = calibration._windows(fp32, model, ["logits"], text, limit)
    logits = np.concatenate([out[0][0] for out in windows]).astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    expected = (p / p.sum(-1, keepdims=True)).mean(0)
    assert use.shape == expected.shape and abs(use.sum() - 1) < 1e-9
    np.testing.assert_allclose(use, expected, rtol=1e-4, atol=1e-10)


def back_tables(back: dict) -> set[str]:
    """The embedding tables of their own among read_back's weights."""
    return {name.split(":")[0] for name in back if name.endswith(":embedding") and name.split(":")[0] not in back}


def test_the_output_layer_by_use_puts_its_bits_on_the_rows_most_used():
    """Four parts of 4096 vocabulary rows, the first used 70% of the time: within the bytes of the whole layer at
    q5_0 (what the allocation gives it), the most used part gets more bits and the least used fewer, so the error
    the logits see, each row's as often as its token comes, is lower than the whole layer at q5_0 (the plan without
    the use)."""
    name = "lm_head.MatMul.weight"
    matrix, h = correlated(4 * gptq.HEAD_ROWS, 64, seed=5)
    use = np.repeat([0.7, 0.1, 0.1, 0.1], gptq.HEAD_ROWS) / gptq.HEAD_ROWS
    plans = {}
    for label, given in (("by use", use), ("whole", None)):
        plan = plans[label] = gptq.Plan({"num_hidden_layers": 8}, use=given)
        plan.measure(name, matrix, h)
        plan.budget = matrix.size * gptq.BYTES["q5_0"]  # the output layer's floor, and no more
        plan.choose()
    assert plans["whole"].chosen == {name: "q5_0"}
    forms = [plans["by use"].chosen[f"{name}{gptq.HEAD_PART}{s}"] for s in range(0, len(use), gptq.HEAD_ROWS)]
    assert gptq.BYTES[forms[0]] > gptq.BYTES["q5_0"] > gptq.BYTES[forms[-1]], forms
    assert plans["by use"].used() <= plans["whole"].used()

    def seen_error(plan: gptq.Plan) -> float:  # each row's output error as often as its token is used
        values = np.concatenate([form.dequantize() for _, _, form in plan.forms(name, matrix, None)])
        return float((use * gptq.row_errors(matrix, values, h)).sum())

    assert seen_error(plans["by use"]) < 0.8 * seen_error(plans["whole"])


def test_convert_int4_takes_the_faithful_route_for_each_source(tiny_qwen2):
    float_route = convert.route(str(tiny_qwen2), {"precision": "int4"})
    assert float_route["quantizer"] == "gptq" and float_route["options"]["algorithm"] == "gptq"
    gguf_route = convert.route(None, {"precision": "int4"})  # the embedded default is a GGUF
    assert gguf_route["quantizer"] == "gguf-native"
    explicit = convert.route(str(tiny_qwen2), {"precision": "int4", "algorithm": "rtn"})
    assert explicit["quantizer"] is None  # --algorithm still chooses: the builder's own RTN
    r = run_inprocess("convert", tiny_qwen2, "--precision", "int4", "--dry-run")
    assert r.rc == 0 and "int4 by gptq: a float source" in " ".join(r.err.split())


def calibration_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_your_calibration_text_changes_the_key_and_the_measurement(tiny_qwen2, tmp_path):
    text = "Invoice 4471 from Acme Ltd, due 2026-01-31, total 1,250.00 EUR. " * 60
    mine = calibration_file(tmp_path / "mine.jsonl", [{"text": text}, {"prompt": "Total?", "expected": "1,250.00"}])
    shipped = convert.route(str(tiny_qwen2), {"precision": "int4"})
    ours = convert.route(str(tiny_qwen2), {"precision": "int4", "calibration": mine})
    assert ours["path"] != shipped["path"]  # another build
    (tmp_path / "elsewhere").mkdir()
    moved = calibration_file(
        tmp_path / "elsewhere" / "mine.jsonl", [{"text": text}, {"prompt": "Total?", "expected": "1,250.00"}]
    )
    assert convert.route(str(tiny_qwen2), {"precision": "int4", "calibration": moved})["path"] == ours["path"]
    # the Python API given the path as a string: the same file, the same build
    assert convert.route(str(tiny_qwen2), {"precision": "int4", "calibration": str(moved)})["path"] == ours["path"]
    fp32 = convert.reference(str(tiny_qwen2), {}).path
    before = calibration.activation_importance(fp32)
    after = calibration.activation_importance(fp32, quality.calibration_text(mine))
    assert not np.allclose(before["lm_head.MatMul.weight"], after["lm_head.MatMul.weight"], rtol=0.05)


@pytest.mark.parametrize(
    "rows,message",
    [
        (None, "cannot read JSONL set"),  # no such file
        ("folder", "is not a regular file"),
        ([{"text": "too short"}], "has 9 characters of text; give at least 2000"),
        ([{"nothing": "here"}], 'each line needs "text", or "prompt" and "expected"'),
    ],
)
def test_a_bad_calibration_file_gets_one_line(tiny_qwen2, tmp_path, rows, message):
    path = tmp_path / "cal.jsonl"
    if rows == "folder":
        path.mkdir()
    elif rows is not None:
        calibration_file(path, rows)
    with pytest.raises(SlmopsError, match=message):
        convert.route(str(tiny_qwen2), {"precision": "int4", "calibration": path})
    r = run_inprocess("convert", tiny_qwen2, "--precision", "int4", "--calibration", path, "--dry-run")
    assert r.rc != 0 and "Traceback" not in r.err and message in " ".join(r.err.split())


def test_h_matrices_are_grouped_within_the_memory_budget():
    # q, k and v read one input (one H), o another; down is twice as wide: 4 bytes * K^2 each
    inputs = {"q": "x1", "k": "x1", "v": "x1", "o": "x2", "down": "x3"}
    widths = {"q": 4, "k": 4, "v": 4, "o": 4, "down": 8}
    assert gptq.hessian_groups(inputs, widths, 1e9) == [list(inputs)]
    assert gptq.hessian_groups(inputs, widths, 2 * 4 * 16) == [["q", "k", "v", "o"], ["down"]]  # down alone is over
    assert gptq.hessian_groups(inputs, widths, 0) == [["q", "k", "v"], ["o"], ["down"]]


def test_a_model_whose_h_does_not_fit_is_measured_in_groups_to_the_same_blocks(tiny_qwen2, tmp_path, monkeypatch):
    from slmops.plugin.roles import ConvertRequest

    fp32 = convert.reference(str(tiny_qwen2), {}).path
    request = ConvertRequest(source_dir=tiny_qwen2, precision="int4", algorithm="gptq", symmetric=False)
    whole, grouped = tmp_path / "whole", tmp_path / "grouped"
    whole.mkdir(), grouped.mkdir()
    gptq.GPTQ().quantize(fp32, whole, request)
    monkeypatch.setattr(gptq, "STATISTICS_SHARE", 0.0)  # no memory to spare: each input's H on its own
    gptq.GPTQ().quantize(fp32, grouped, request)
    reports = [json.loads((d / gguf_native.REPORT).read_text()) for d in (whole, grouped)]
    assert reports[0]["statistics_groups"] == 1 and reports[1]["statistics_groups"] > 3
    assert reports[0]["forms"] == reports[1]["forms"]
    assert (whole / "model.onnx.data").read_bytes() == (grouped / "model.onnx.data").read_bytes()


def test_int8_of_a_float_source_is_q8_0_in_every_weight_embedding_included(tiny_qwen2):
    assert convert.route(str(tiny_qwen2), {"precision": "int8"})["quantizer"] == "q8_0"
    assert convert.route(None, {"precision": "int8"})["quantizer"] != "q8_0"  # a GGUF source: its route as before
    ours = convert.convert(str(tiny_qwen2), {"precision": "int8"})
    builder = convert.convert(str(tiny_qwen2), {"precision": "int8", "algorithm": "rtn"})
    assert ours.verification["ok"] and builder.verification["ok"]
    report = json.loads((ours.path / gguf_native.REPORT).read_text())
    forms = {kind for counts in (report["exact"], report["approximate"]) for kind in counts}
    assert forms == {"q8_0"}, report
    fp32 = convert.reference(str(tiny_qwen2), {}).path
    sizes = [(b.path / "model.onnx.data").stat().st_size for b in (ours, builder)]
    klds = [quality.compare(b.path, fp32).mean_kld for b in (ours, builder)]
    assert sizes[0] < 0.6 * sizes[1]  # the embedding (most of this tiny model) in 8 bits, not float
    assert klds[0] < 2 * klds[1] + 1e-4
    # float activations, no kernel: the same blocks as two 4-bit MatMulNBits planes, verified as int8
    planes = convert.convert(str(tiny_qwen2), {"precision": "int8", "accuracy_level": 1})
    assert planes.manifest["quantizer"] == "q8_0" and planes.verification["ok"]


def test_int8_wins_back_what_the_folder_carries_from_the_weights_rounding_costs_least():
    rng = np.random.default_rng(0)
    layer = "model.layers.{}.mlp.down_proj.MatMul.weight"
    matrices = {layer.format(i): rng.standard_normal((64, 128)).astype(np.float32) for i in range(4)}
    matrices[layer.format(0)][:, ::32] = 40.0  # an outlier in every block: 6-bit codes lose most of the rest
    matrices["lm_head.MatMul.weight"] = rng.standard_normal((256, 128)).astype(np.float32)
    importance = {name: np.ones(128, dtype=np.float32) for name in matrices}
    saving = 64 * 128 * (gptq.BYTES["q8_0"] - gptq.BYTES["q6_0"])  # one decoder weight's, Q8_0 -> Q6_0
    chosen = gptq.q6_to_fit(matrices, importance, 1.5 * saving)
    assert len(chosen) == 2 and layer.format(0) not in chosen and "lm_head.MatMul.weight" not in chosen
    assert gptq.q6_to_fit(matrices, importance, 0) == set()
    assert gptq.q6_to_fit(matrices, importance, 4.5 * saving) == set()  # cannot fit: every weight stays Q8_0


def test_int8_of_a_float_model_is_no_larger_than_llama_cpps_q8_0_of_it(default_checkpoint):
    """SmolLM2-135M as a float checkpoint: its int8 folder (tokenizer.json, RoPE tables, outlier codes and kernel
    included) within the bytes of the Q8_0 GGUF of the same weights (the shipped GGUF's header and metadata, every
    matrix in Q8_0 blocks, the rest float32, as llama-quantize writes it)."""
    import gguf

    from slmops.build import sources
    from slmops.host.fsutil import dir_size

    reader = gguf.GGUFReader(sources.resolve("default").original)
    q8_0 = reader.data_offset + sum(
        -(-(t.n_elements * (34 / 32 if len(t.shape) == 2 else 4)) // reader.alignment) * reader.alignment
        for t in reader.tensors
    )
    build = convert.convert(str(default_checkpoint), {"precision": "int8"})
    report = json.loads((build.path / gguf_native.REPORT).read_text())
    assert build.manifest["quantizer"] == "q8_0" and build.verification["ok"]
    assert report["q6_0"] and report["q6_0_bytes_saved"] >= report["carried_bytes"] > 0, report
    assert dir_size(build.path) <= q8_0, (dir_size(build.path), q8_0)


def test_learned_scales_bring_the_rounded_model_closer_to_its_source(tmp_path, default_checkpoint, monkeypatch):
    # The DWQ-like lever: from plain Q4_0 rounding of every weight, steps of fitting the scales to the source's own
    # next-token distributions lower the KL on a window they never saw; the codes stay, the scales are fp16. Weights
    # 10x the usual random ones, so the tiny model's distributions are peaked enough for rounding to move them.
    import torch
    from transformers import AutoModelForCausalLM

    from slmops.plugins import distill

    from .conftest import build_tiny

    tiny = build_tiny(tmp_path / "peaked", default_checkpoint, "llama", initializer_range=0.2)
    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    matrices = {n: p.detach().numpy().copy() for n, p in model.named_parameters() if p.ndim == 2}
    forms = {n: [(0, m.shape[0], gptq.rounded(m, None, "q4_0"))] for n, m in matrices.items()}
    codes = {n: runs[0][2].codes.copy() for n, runs in forms.items()}
    scales = {n: runs[0][2].scales.copy() for n, runs in forms.items()}
    # text of one kind (the window held out is like the ones fitted on), in windows of 128 to keep the test short
    text = "Invoice 4471 from Acme Ltd, due 2026-01-31, total 1,250.00 EUR, paid by transfer. " * 80
    monkeypatch.setattr(distill, "WINDOW", 128)
    learned = distill.distill(tiny, matrices, forms, calibration.calibration_tokens(tiny, text), steps=20, rate=0.01)
    before, after = learned["held_out_kl"]
    assert after < 0.7 * before, learned
    for name, runs in forms.items():
        form = runs[0][2]
        assert np.array_equal(form.codes, codes[name])
        assert np.array_equal(form.scales, form.scales.astype(np.float16).astype(np.float32))
    assert any(not np.array_equal(runs[0][2].scales, scales[n]) for n, runs in forms.items())


def test_fisher_sensitivity_says_where_a_change_of_the_weights_costs_the_model(
    tmp_path, default_checkpoint, monkeypatch
):
    # gptq.sensitivity=fisher ranks the forms by sum(F * dW^2), so F must say where the weights matter: the same small
    # change costs the model (KL against its own outputs) several times more on a weight's most sensitive entries by F
    # than on its least sensitive ones.
    import torch
    from transformers import AutoModelForCausalLM

    from slmops.plugins import distill

    from .conftest import build_tiny

    tiny = build_tiny(tmp_path / "peaked", default_checkpoint, "llama", initializer_range=0.2)
    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()
    matrices = {n: p.detach().numpy().copy() for n, p in model.named_parameters() if p.ndim == 2}
    text = "Invoice 4471 from Acme Ltd, due 2026-01-31, total 1,250.00 EUR, paid by transfer. " * 40
    monkeypatch.setattr(distill, "WINDOW", 128)
    tokens = calibration.calibration_tokens(tiny, text)
    sensitivity = distill.fisher(tiny, matrices, tokens)
    assert sensitivity.keys() == matrices.keys()
    assert all(f.shape == matrices[n].shape and (f >= 0).all() and f.any() for n, f in sensitivity.items())

    x = torch.tensor([tokens[:128]])
    with torch.no_grad():
        source = torch.log_softmax(model(x).logits, -1)

    def kl_after_change(name: str, entries: np.ndarray) -> float:
        p = model.get_parameter(name)
        saved = p.detach().clone()
        change = np.zeros(p.shape, dtype=np.float32)
        change.flat[entries] = 0.05 * np.random.default_rng(0).choice([-1, 1], len(entries))
        with torch.no_grad():
            p += torch.from_numpy(change)
            got = torch.log_softmax(model(x).logits, -1)
            p.copy_(saved)
        return float((source.exp() * (source - got)).sum(-1).mean())

    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        order = np.argsort(sensitivity[name], axis=None)
        count = order.size // 50
        most, least = kl_after_change(name, order[-count:]), kl_after_change(name, order[:count])
        assert most > 3 * least, (name, most, least)  # at random entries: about 1x


def test_a_build_ranked_by_fisher_sensitivity_stays_within_the_budget(tiny_qwen2):
    # --option gptq.sensitivity=fisher: another build, said in slmops-quantization.json, within Q4_K_M's bytes; the
    # default ranks by each layer's output error.
    plain = convert.convert(str(tiny_qwen2), {"precision": "int4", "algorithm": "gptq"})
    options = {"precision": "int4", "algorithm": "gptq", "plugin_options": {"gptq": {"sensitivity": "fisher"}}}
    ranked = convert.convert(str(tiny_qwen2), options)
    assert ranked.path != plain.path and ranked.verification["ok"]
    report = json.loads((ranked.path / gguf_native.REPORT).read_text())
    assert report["sensitivity"] == "fisher"
    assert report["bytes"] <= max(report["budget_bytes"], report["floor_bytes"])
    assert json.loads((plain.path / gguf_native.REPORT).read_text())["sensitivity"] == "output"


def test_a_q5_k_m_budget_spends_more_bytes_on_less_error():
    # --option gptq.budget=Q5_K_M (deploy's next candidate): the bytes llama.cpp's Q5_K_M gives the same weights, so
    # wider forms and less error than within Q4_K_M's, and still within its budget. (The tiny test models are over
    # either budget with their 3.5 MB tokenizer, so this plans 8 layers of 256-wide weights directly.)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 256)).astype(np.float32) * np.linspace(0.2, 3, 256, dtype=np.float32)
    h = x.T @ x / len(x)
    weights = {
        f"model.layers.{i}.mlp.{kind}.MatMul.weight": rng.standard_normal((64, 256)).astype(np.float32)
        for i in range(8)
        for kind in ("up_proj", "down_proj")
    }
    plans = {}
    for recipe in ("Q4_K_M", "Q5_K_M"):
        plan = plans[recipe] = gptq.Plan({"num_hidden_layers": 8}, recipe=recipe)
        for name, matrix in weights.items():
            plan.measure(name, matrix, h)
        plan.choose()
    small, large = plans["Q4_K_M"], plans["Q5_K_M"]
    assert large.budget == sum(gptq.recipe_bytes(n, 64, 256, 8, "Q5_K_M") for n in weights) > small.budget
    assert small.used() <= small.budget and small.used() < large.used() <= large.budget
    error = lambda plan: sum(plan.errors[n][f] for n, f in plan.chosen.items())  # noqa: E731
    assert error(large) < error(small)


def test_a_build_with_learned_scales_holds_them(tiny_qwen2):
    # --option gptq.learned_scales=N: another build, what it learned in slmops-quantization.json, still verified.
    plain = convert.convert(str(tiny_qwen2), {"precision": "int4", "algorithm": "gptq"})
    tuned = convert.convert(
        str(tiny_qwen2),
        {
            "precision": "int4",
            "algorithm": "gptq",
            "plugin_options": {"gptq": {"learned_scales": 3, "learned_scales_rate": 0.01}},
        },
    )
    assert tuned.path != plain.path and tuned.verification["ok"]
    report = json.loads((tuned.path / gguf_native.REPORT).read_text())["learned_scales"]
    assert report["steps"] == 3 and len(report["held_out_kl"]) == 2
    held, before = gguf_native.read_back(tuned.path), gguf_native.read_back(plain.path)
    assert held.keys() == before.keys()
    assert any(not np.array_equal(held[name], before[name]) for name in held)  # the scales the graph holds moved


@pytest.mark.parametrize("option", [{"learned_scales": 2}, {"sensitivity": "fisher"}])
def test_learned_scales_or_fisher_that_do_not_fit_in_memory_are_refused_before_the_rounding(
    tiny_qwen2, monkeypatch, option, tmp_path
):
    monkeypatch.setenv("SLMOPS_HOME", str(tmp_path))  # not a build another test made already
    monkeypatch.setattr(gptq, "available_memory", lambda: 1 << 20)  # 1 MB left to this process
    monkeypatch.setattr(gptq, "statistics_budget", lambda fp32_dir: 1 << 30)
    monkeypatch.setattr(gptq.Plan, "measure", lambda *a: pytest.fail("measured before refusing"))
    options = {"precision": "int4", "algorithm": "gptq", "plugin_options": {"gptq": option}}
    with pytest.raises(SlmopsError, match="learning the scales or the sensitivity of this model takes about .* GB"):
        convert.convert(str(tiny_qwen2), options)


@pytest.fixture(scope="module")
def tiny_tied_fp32(tmp_path_factory, default_checkpoint):
    """The fp32 build of a tiny Llama whose embedding is its output layer (as SmolLM2's)."""
    from .conftest import build_tiny

    out = build_tiny(
        tmp_path_factory.mktemp("tied") / "tiny-tied", default_checkpoint, "llama", tie_word_embeddings=True
    )
    return convert.reference(str(out), {}).path


@pytest.mark.parametrize("in_kernel", [False, True])
def test_a_tied_embedding_in_runs_of_several_forms_reads_each_row_from_its_run(tiny_tied_fp32, tmp_path, in_kernel):
    """gptq.head_by_use gives the output layer's rows runs of several forms; the tied embedding then gathers each id's
    row from the run that holds it (MatMulNBits tensors, or the kernel's)."""
    import onnx
    import onnxruntime as ort

    library = gguf_kernel.library() if in_kernel else None
    if in_kernel and library is None:
        pytest.skip("the slmops-kernel wheel is not installed")
    head = "lm_head.MatMul.weight"
    table = gptq.weights_of(tiny_tied_fp32)[head]
    rows = table.shape[0]
    cut = [0, 4096, 8192, rows]  # a run with offsets (q4_1) between two without
    runs = [
        (s, e, gptq.rounded(np.ascontiguousarray(table[s:e]), None, f))
        for s, e, f in zip(cut[:-1], cut[1:], ["q8_0", "q4_1", "q5_0"], strict=True)
    ]

    def forms_of(name, matrix):
        return runs if name == head else [(0, matrix.shape[0], gptq.rounded(matrix, None, "q8_0"))]

    out = tmp_path / "built"
    out.mkdir()
    gguf_native.write_blocks(tiny_tied_fp32, out, forms_of, gguf_native.INTEGER_ACTIVATIONS, {}, None, library)
    fp32 = onnx.load(str(tiny_tied_fp32 / "model.onnx"), load_external_data=False)
    gathered = next(n.output[0] for n in fp32.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    model.graph.output.append(onnx.helper.make_tensor_value_info(gathered, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(out))
    if library:
        options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    ids = np.array([[0, 7, 4095, 4096, 4097, 8191, 8192, 20000, rows - 1]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            kind = np.float16 if i.type == "tensor(float16)" else np.float32  # the kernel's attention: an fp16 cache
            feeds[i.name] = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), dtype=kind)
    got = session.run([gathered], {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}})[0][0]
    expected = np.concatenate([form.dequantize() for _, _, form in runs])[ids[0]]
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-6), np.abs(got - expected).max()
    back = gguf_native.read_back(out)  # and read back: the table is the output layer's rows, run by run
    assert np.array_equal(back[f"{head}:embedding"], np.concatenate([form.dequantize() for _, _, form in runs]))


def test_a_fine_tune_of_a_4bit_model_is_not_rounded_back_onto_its_base():
    # A float source fine-tuned from a dequantized 4-bit model (the default GGUF is Q4_1) lies a small fraction of a
    # step off its base's grid: q4_1 (and q5_1) fit that grid again and round every weight back to its base value,
    # which measures as the least error and undoes the fine-tune. Those forms are ruled out for such a weight; the
    # base itself (exactly on the grid) keeps them, and a float weight (off any grid) is unaffected.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 256)).astype(np.float32) * np.linspace(0.2, 3, 256, dtype=np.float32)
    h = x.T @ x / len(x)
    base = gptq.rounded(rng.standard_normal((64, 256)).astype(np.float32), None, "q4_1").dequantize()
    step = np.repeat(gptq.rounded(base, None, "q4_1").scales, gptq.BLOCK, axis=1)
    change = (rng.random(base.shape) - 0.5).astype(np.float32) * 0.06 * step  # a fine-tune: 3% of a step at most
    names = {"base": base, "tuned": base + change, "float": base + (rng.random(base.shape) - 0.5) * step}
    weights = {f"model.layers.{i}.mlp.up_proj.MatMul.weight": m for i, m in enumerate(names.values())}
    plan = gptq.Plan({"num_hidden_layers": 3}, recipe="Q5_K_M")
    for name, matrix in weights.items():
        plan.measure(name, matrix, h)
    plan.choose()
    base_name, tuned_name, float_name = weights
    assert set(plan.snapped) == {tuned_name} and {"q4_1", "q5_1"} <= set(plan.snapped[tuned_name])
    assert plan.chosen[tuned_name] not in plan.snapped[tuned_name]
    # what the chosen form keeps of the fine-tune's change (1: all of it, 0: rounded back to the base)
    ((_, _, form),) = plan.forms(tuned_name, weights[tuned_name], h)
    kept = float(((form.dequantize() - base) * change).sum() / (change * change).sum())
    snapped_back = gptq.gptq(weights[tuned_name], h, "q4_1").dequantize()
    assert kept > 0.3 and float(((snapped_back - base) * change).sum() / (change * change).sum()) < 0.15
    assert plan.errors[base_name]["q4_1"] < 1e-9  # exactly on its grid: the base itself, exact in q4_1
