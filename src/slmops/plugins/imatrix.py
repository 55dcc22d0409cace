"""Quantizer: int4 for any source, in the shape of GGUF's Q4_1/Q4_K blocks. Each block of 32 weights has a scale and
a float minimum (value = scale * code + min, codes 0..15), fitted per block as llama.cpp's make_qkx2_quants does: a
weighted least-squares fit of scale and min for each of 21 candidate roundings, the best kept, then refined.

The fit is data-aware, as llama.cpp's with an importance matrix: each input channel of a MatMul counts by the mean
square of what flows into it, measured by running the fp32 graph (ONNX Runtime) over calibration text that slmops
does not score on (the documentation of some Python standard library modules, so nothing is downloaded).

The gguf-native writer takes these blocks: MatMulNBits holds the codes, and the minimum is added exactly by the
block-offset correction, so a float zero point (HQQ's, which ONNX Runtime runs on a slow path) costs nothing here.
The output layer (and an embedding table, tied or not) keeps 8 bits, as llama.cpp's Q4_K_M keeps Q6_K for it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slmops.api import (
    ConvertRequest,
    Quantizer,
    SlmopsError,
    by_row_runs,
    calibration_text,
    hookimpl,
)
from slmops.plugins import gguf_blocks, gguf_native
from slmops.plugins.calibration import activation_importance

KIND = "q4_imatrix"  # the form's name in slmops-quantization.json
CODES = 15  # 4-bit codes 0..15
STEPS = 20  # candidate scales nmax + rmin + rdelta * i for i in 0..STEPS, as make_qkx2_quants(..., -1, 0.1, 20)
REFINE = 2  # rounds of re-rounding with the fitted scale and min, then fitting again
# rows fitted together at most, a run per CPU (the candidate arrays of a 49k x 576 table at once take gigabytes)
ROWS_AT_ONCE = 4096


def dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sum of a * b over the last axis (einsum: 2x numpy's sum of a product over an axis of 32)."""
    return np.einsum("...i,...i->...", a, b)


def search_blocks(x: np.ndarray, w: np.ndarray, top: int = CODES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, scale, min) of blocks x [..., block] under weights w of the same shape; codes 0..top. Each candidate
    rounding gets the weighted least-squares scale and min; at those, the weighted squared error is
    sum(w x^2) - scale * sum(w c x) - min * sum(w x), so it comes from the sums the fit needs (per-block sums in
    float64; an infinite error where the fit is degenerate, all codes equal)."""
    lo, hi = x.min(-1), x.max(-1)
    span = np.where(hi > lo, hi - lo, 1.0)
    best_codes = np.clip(np.rint((x - lo[..., None]) / span[..., None] * top), 0, top)
    best_scale, best_low = span / top, lo
    best_error = (w * (best_scale[..., None] * best_codes + lo[..., None] - x) ** 2).sum(-1, dtype=np.float64)
    wx = w * x
    sw, sx, sxx = w.sum(-1, dtype=np.float64), wx.sum(-1, dtype=np.float64), dot(wx, x).astype(np.float64)
    candidates = [(top - 1 + 0.1 * i) / span for i in range(STEPS + 1)]
    codes = np.empty_like(x)
    for _ in range(REFINE + 1):
        for inverse in candidates:
            np.subtract(x, lo[..., None], out=codes)
            codes *= inverse[..., None]
            np.clip(np.rint(codes, out=codes), 0, top, out=codes)
            wc = w * codes
            sl, sl2, sxl = wc.sum(-1, dtype=np.float64), dot(wc, codes).astype(np.float64), dot(codes, wx)
            det = sw * sl2 - sl * sl
            ok = det > 0
            det = np.where(ok, det, 1.0)
            scale, low = (sw * sxl - sx * sl) / det, (sl2 * sx - sl * sxl) / det
            error = np.where(ok, sxx - scale * sxl - low * sx, np.inf)
            better = error < best_error
            best_codes = np.where(better[..., None], codes, best_codes)
            best_scale, best_low = np.where(better, scale, best_scale), np.where(better, low, best_low)
            best_error = np.where(better, error, best_error)
        # Refine: round again against the best fit so far (the grid it found, not the min/max one).
        safe = np.where(best_scale > 0, best_scale, 1.0)
        lo, candidates = best_low, [1 / safe]
    return best_codes.astype(np.uint8), best_scale.astype(np.float32), best_low.astype(np.float32)


def fit_weights(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """How much each weight of blocks x [rows, blocks, block] counts in the fit, as llama.cpp's for Q4_K: with an
    importance per input channel, importance * sqrt(block mean square + x^2); without, |x| plus the block's RMS, so
    large weights count more."""
    if importance is None:
        return np.abs(x) + np.sqrt((x * x).mean(-1, keepdims=True))
    return importance.astype(np.float32).reshape(1, -1, x.shape[-1]) * np.sqrt((x * x).mean(-1, keepdims=True) + x * x)


def quantize_matrix(matrix: np.ndarray, block: int = 32, importance: np.ndarray | None = None) -> gguf_blocks.BlockForm:
    """A matrix [rows, cols] as 4-bit blocks along its rows with a scale and a float min each, fitted under
    fit_weights."""
    rows, cols = matrix.shape

    def fit(run: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # float32 is enough: the fitted error agreed with a float64 fit to 1e-5 and took half the time
        x = matrix[run].reshape(-1, cols // block, block).astype(np.float32)
        codes, scale, low = search_blocks(x, fit_weights(x, importance))
        return codes.reshape(len(x), cols), scale, low

    codes, scales, lows = by_row_runs(fit, rows, ROWS_AT_ONCE)
    zero = np.zeros(scales.shape, dtype=np.uint8)
    return gguf_blocks.BlockForm(KIND, 4, block, codes, scales, zero, lows)


def keeps_8_bits(name: str) -> bool:
    """The output layer and embedding tables: the tensors int4 hurts most (one row per vocabulary entry)."""
    return "lm_head" in name or "embed" in name


def blocks_of(matrix: np.ndarray, block: int, importance: np.ndarray | None = None) -> gguf_blocks.BlockForm:
    """A weight's searched blocks, or its 8-bit ones where the search would round it back onto a 4-bit grid it lies
    near but not on (a fine-tune of a 4-bit model: gguf_blocks.snapping), which would undo what the fine-tune
    changed while it measures as the least error."""
    form = quantize_matrix(matrix, block, importance)
    if gguf_blocks.snapping({KIND: gguf_blocks.grid_distance(matrix, form.dequantize(), form)}):
        return gguf_native.rtn8(matrix, block)
    return form


class Imatrix(Quantizer):
    name = "imatrix"
    description = "int4 blocks, a scale and float min each, fitted under an importance matrix; 8-bit lm_head"
    precisions = ("int4",)
    algorithms = ("imatrix",)
    cost = 6

    def check(self, request: ConvertRequest) -> str | None:
        if request.algorithm != "imatrix":
            return "quantizes by --algorithm imatrix only"
        if request.symmetric:
            return "imatrix fits a float minimum per block: add --asymmetric"
        if request.keeps_adapter:
            return "imatrix quantizes merged weights (a LoRA fed at run time stays float): use --adapter-mode merge"
        return super().check(request)

    def quantize(self, fp32_dir: Path, output_dir: Path, request: ConvertRequest) -> None:
        importance = activation_importance(
            fp32_dir, calibration_text(request.calibration) if request.calibration else None
        )

        four_bit = []

        def forms_of(name: str, matrix: np.ndarray) -> list[tuple[int, int, gguf_blocks.BlockForm]]:
            if matrix.shape[1] % request.block_size:  # no whole blocks: stays float, as the builder leaves it
                return []
            if keeps_8_bits(name):
                return [(0, matrix.shape[0], gguf_native.rtn8(matrix, request.block_size))]
            form = blocks_of(matrix, request.block_size, importance.get(name))
            if form.bits == 4:
                four_bit.append(name)
            return [(0, matrix.shape[0], form)]

        # Integer compute (level 4) unless asked: on a float source int8 activations cost a little KLD and gain
        # much decode (docs/architecture.md, "The measurements behind the constants"); the weights are approximate
        # anyway, and --accuracy-level 1 keeps float activations.
        level = gguf_native.accuracy_level(request)
        gguf_native.write_blocks(fp32_dir, output_dir, forms_of, level, {"algorithm": "imatrix"})
        if not four_bit:  # an int8 under the int4 name (seen on a fine-tune of the 4-bit default model)
            raise SlmopsError(
                "imatrix kept every weight at 8 bits: each lies near a 4-bit grid it is not on (a fine-tune of a "
                "4-bit model), which 4-bit would round the fine-tune away onto; use --algorithm gptq, or --precision "
                "int8"
            )


@hookimpl
def register_quantizers(register):
    register(Imatrix())
