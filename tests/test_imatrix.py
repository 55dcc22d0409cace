"""imatrix, the int4 of a float source: the searched blocks fit closer than min/max and integer zero points, the
importance comes from what really flows into each MatMul (checked against torch), the graph holds exactly the
blocks the search chose, and the build is closer to fp32 than the builder's RTN int4."""

import json

import numpy as np
import pytest

from slmops.build import convert
from slmops.errors import SlmopsError
from slmops.measure import quality
from slmops.plugins import calibration, gguf_native, imatrix


def weighted_error(form, matrix: np.ndarray, w: np.ndarray) -> float:
    return float((w * (form.dequantize() - matrix) ** 2).sum())


def min_max(matrix: np.ndarray, integer_zero_point: bool):
    """Q4_1 as llama.cpp's quantize_row_q4_1 (scale from the range, the minimum as is), or with the minimum rounded
    to a whole number of steps (an integer zero point, as MatMulNBits' own asymmetric RTN keeps it)."""
    x = matrix.reshape(matrix.shape[0], -1, 32)
    lo, hi = x.min(-1), x.max(-1)
    d = (hi - lo) / 15
    if integer_zero_point:
        lo = -np.clip(np.rint(-lo / d), 0, 15) * d
    codes = np.clip(np.rint((x - lo[..., None]) / d[..., None]), 0, 15).astype(np.uint8).reshape(matrix.shape)
    zero = np.zeros(d.shape, dtype=np.uint8)
    return gguf_native.gguf_blocks.BlockForm("minmax", 4, 32, codes, d.astype(np.float32), zero, lo.astype(np.float32))


def test_search_fits_closer_than_min_max_and_integer_zero_points():
    rng = np.random.default_rng(0)
    matrix = rng.laplace(0, 0.02, (64, 256)).astype(np.float32)  # heavy-tailed, as trained weights are
    importance = rng.random(256).astype(np.float32) ** 4  # a few channels carry most of the signal
    form = imatrix.quantize_matrix(matrix, 32, importance)
    assert form.codes.max() <= 15 and form.scales.shape == form.offsets.shape == (64, 8)
    w = importance[None, :] * np.ones_like(matrix)
    found = weighted_error(form, matrix, w)
    assert found < 0.8 * weighted_error(min_max(matrix, False), matrix, w)
    assert found < 0.8 * weighted_error(min_max(matrix, True), matrix, w)
    # The importance is what the fit minimises: without it, the error it weighs is larger.
    assert found < weighted_error(imatrix.quantize_matrix(matrix, 32), matrix, w)


def a_fine_tune_of_its_4bit_form(matrix: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A float weight's 4-bit form (the base), the grid's step per weight, and a fine-tune's change to the base: at most
    3% of a step, so base + change lies near the base's grid but not on it."""
    base = imatrix.quantize_matrix(matrix, 32).dequantize()
    step = np.repeat(np.abs(imatrix.quantize_matrix(base, 32).scales), 32, axis=1)
    return base, step, (rng.random(base.shape) - 0.5).astype(np.float32) * 0.06 * step


def test_a_fine_tune_of_a_4bit_model_keeps_its_change_at_8_bits():
    # imatrix has one 4-bit form. A float source fine-tuned from a dequantized 4-bit model lies a few hundredths of a
    # step off its base's grid; the search finds that grid again and rounds the fine-tune's change away (what it
    # measures as the least error). Such a weight takes 8-bit blocks; the base itself (on its grid) and a float
    # weight (off any grid) keep the 4-bit search.
    rng = np.random.default_rng(0)
    base, step, change = a_fine_tune_of_its_4bit_form(rng.laplace(0, 0.02, (64, 256)).astype(np.float32), rng)
    tuned = base + change

    def kept(form) -> float:  # what a form keeps of the fine-tune's change (1: all of it, 0: the base again)
        return float(((form.dequantize() - base) * change).sum() / (change * change).sum())

    assert kept(imatrix.quantize_matrix(tuned, 32)) < 0.15  # the search alone rounds it back onto the base
    form = imatrix.blocks_of(tuned, 32)
    assert form.bits == 8 and kept(form) > 0.9
    on_grid = imatrix.blocks_of(base, 32)
    assert on_grid.bits == 4 and np.abs(on_grid.dequantize() - base).max() < 1e-6
    assert imatrix.blocks_of((base + (rng.random(base.shape) - 0.5) * step).astype(np.float32), 32).bits == 4


def test_a_build_where_every_weight_snaps_is_refused_in_one_line(tiny_qwen2, tmp_path):
    """Every projection of a tiny Qwen2 a few hundredths of a step off a 4-bit grid (a fine-tune of a 4-bit model,
    as the benchmarks' order fine-tune of the default model is): every weight takes 8-bit blocks, and the build is
    refused with the reason and what to use instead (it was 'verification failed: asked int4 but MatMulNBits bits
    are [8]')."""
    import shutil

    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_qwen2, tuned)
    weights = load_file(tuned / "model.safetensors")
    for name, w in weights.items():
        if w.ndim == 2 and "proj" in name:
            base, _, change = a_fine_tune_of_its_4bit_form(w.astype(np.float32), rng)
            weights[name] = (base + change).astype(w.dtype)
    save_file(weights, tuned / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SlmopsError, match="imatrix kept every weight at 8 bits.*use --algorithm gptq"):
        convert.convert(str(tuned), {"precision": "int4", "algorithm": "imatrix", "symmetric": False})


def test_importance_is_the_mean_square_of_each_matmul_input_as_torch_computes_it(tiny_qwen2):
    import torch
    from transformers import AutoModelForCausalLM

    fp32 = convert.convert(str(tiny_qwen2), {"precision": "fp32"}).path
    importance = calibration.activation_importance(fp32)
    assert len(importance) == 2 * 5 + 1  # per layer qkv, o, gate, up, down; and the lm_head
    tokens = calibration.calibration_tokens(fp32)
    assert len(tokens) == calibration.CALIBRATION_TOKENS
    model = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2), dtype=torch.float32).eval()
    seen = []
    model.lm_head.register_forward_hook(lambda _m, args, _out: seen.append(args[0][0].double()))
    with torch.no_grad():
        for start in range(0, len(tokens), calibration.WINDOW):
            model(torch.tensor([tokens[start : start + calibration.WINDOW]]))
    expected = (torch.cat(seen) ** 2).mean(0).numpy()
    np.testing.assert_allclose(importance["lm_head.MatMul.weight"], expected, rtol=1e-3)


def test_imatrix_build_holds_the_searched_blocks_and_beats_rtn(tiny_qwen2):
    import onnx
    from onnx import numpy_helper

    build = convert.convert(str(tiny_qwen2), {"precision": "int4", "algorithm": "imatrix", "symmetric": False})
    assert build.manifest["quantizer"] == "imatrix" and build.verification["ok"]
    fp32 = convert.reference(str(tiny_qwen2), {}).path
    source = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(fp32 / "model.onnx")).graph.initializer}
    importance = calibration.activation_importance(fp32)
    back = gguf_native.read_back(build.path)
    report = json.loads((build.path / gguf_native.REPORT).read_text())
    assert set(report["approximate"]) == {imatrix.KIND, "rtn8"} and report["exact"] == {}
    for name, values in back.items():
        if name.endswith(":embedding") or imatrix.keeps_8_bits(name):
            assert report["tensors"][name.split(":")[0]] == [[0, values.shape[0 if ":" in name else 1], "rtn8"]]
            continue
        expected = imatrix.quantize_matrix(np.ascontiguousarray(source[name].T), 32, importance[name]).dequantize()
        assert np.array_equal(values, expected.T), name  # the graph computes with exactly the searched blocks
    assert build.verification["graph"]["accuracy_levels"] == [gguf_native.INTEGER_ACTIVATIONS]
    # two layers of q/k/v, o, gate and up packed as one, down; the lm_head at 8 bits
    assert build.verification["graph"]["matmul_nbits"] == {"4": 8, "8": 1}
    rtn = convert.convert(str(tiny_qwen2), {"precision": "int4", "algorithm": "rtn_last", "symmetric": False})
    assert quality.compare(build.path, fp32).mean_kld < quality.compare(rtn.path, fp32).mean_kld
    # The weights alone (float activations, where int8 rounding of a tiny model's activations does not blur them):
    floats = {"precision": "int4", "symmetric": False, "accuracy_level": 1}
    kq1 = convert.convert(str(tiny_qwen2), {**floats, "algorithm": "imatrix"})
    rtn1 = convert.convert(str(tiny_qwen2), {**floats, "algorithm": "rtn_last"})
    assert quality.compare(kq1.path, fp32).mean_kld < 0.8 * quality.compare(rtn1.path, fp32).mean_kld


def test_imatrix_asks_for_asymmetric(tiny_qwen2):
    with pytest.raises(SlmopsError, match="imatrix fits a float minimum per block: add --asymmetric"):
        convert.convert(str(tiny_qwen2), {"precision": "int4", "algorithm": "imatrix"})


def test_calibration_text_is_shipped_not_rendered(monkeypatch, default_checkpoint):
    """pydoc's text differs between Python releases (3.11.2 and 3.11.7 already differ in the first 20k characters)
    and, through live objects, between runs: rendered at build time, it gave each interpreter its own outlier
    channels and so its own build. The text is the shipped file, long enough for every calibration token."""
    import pydoc
    from importlib import resources

    def no_rendering(*args, **kwargs):
        raise AssertionError("calibration text rendered by pydoc at build time")

    monkeypatch.setattr(pydoc, "render_doc", no_rendering)
    text = calibration.calibration_text()
    assert text == resources.files("slmops").joinpath("data/calibration.txt").read_text(encoding="utf-8")
    assert " at 0x" not in text and "<stdlib>" in text
    assert len(calibration.calibration_tokens(default_checkpoint)) == calibration.CALIBRATION_TOKENS
