"""Quantizer: the int4 for float checkpoints (a fine-tune, a merged LoRA). Three levers, each measured on a float
SmolLM2 against torch (docs/user-guide.md, section 2):

- Error-compensating rounding (GPTQ): columns are rounded one at a time and the rounding error of each is pushed onto
  the columns not yet rounded, through the inverse of H = E[x x^T], what flows into the MatMul on calibration text.
  Each block of 32 gets its scale and minimum when its first column comes up, fitted to the weights as updated by
  then, under the importance of each input channel (diag H), as llama.cpp's make_qkx2_quants with an imatrix.
- Bits where they count: each weight takes one of llama.cpp's block forms of 32: 4-bit or 5-bit codes with a fp16
  scale (Q4_0 / Q5_0) or a scale and a minimum (Q4_1 / Q5_1), or 8-bit (Q8_0). All start at the smallest; the change
  that removes the most output error (measured on the calibration text, relative to the output) per byte is taken
  while the bytes stay within what llama.cpp's Q4_K_M takes for the same model (its rules, `recipe_bytes`): the same
  budget, spent by measurement rather than by tensor name.
- The fp16 scale and minimum are what the fit sees, so slmops's GGUF kernel holds the blocks exactly and applies the
  minimum and each MatMul's activation outlier channels (kept in float, as for a GGUF source) inside the kernel.
  Without the kernel the same blocks go to MatMulNBits with a float correction: the same weights, slower.
- Opt-in (--option gptq.learned_scales=STEPS): the blocks' scales fitted to the source's own outputs after rounding,
  the whole model at once (distill.py, as mlx-lm's DWQ)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from slmops.api import (
    ConvertRequest,
    GraphFacts,
    PluginOptions,
    Quantizer,
    SlmopsError,
    allowed_cpus,
    available_memory,
    by_row_runs,
    calibration_text,
    dir_size,
    hookimpl,
    need_extra,
    options_of,
    progress_count,
    runtime_fed_matmuls,
)
from slmops.plugins import calibration, distill, gguf_blocks, gguf_kernel, gguf_native
from slmops.plugins.gguf_blocks import half
from slmops.plugins.imatrix import ROWS_AT_ONCE, dot, fit_weights, search_blocks

BLOCK = 32
# The block forms a weight may take: name -> (code bits, has a minimum). Names as in slmops-quantization.json.
FORMS = {
    "q4_0": (4, False),
    "q4_1": (4, True),
    "q5_0": (5, False),
    "q5_1": (5, True),
    "q6_0": (6, False),  # slmops's own (the kernel's Q6_0): between Q5_1 (6 bits a weight) and Q8_0 (8.5)
    "q8_0": (8, False),
}
CHOICES = tuple(FORMS)
# Bytes per weight: the codes, a fp16 scale and (q4_1, q5_1) a fp16 minimum per 32 weights.
BYTES = {name: (bits * BLOCK + 16 + 16 * minimum) / 8 / BLOCK for name, (bits, minimum) in FORMS.items()}
SMALLEST = min(CHOICES, key=BYTES.get)
# The output layer's (and an embedding's) least bytes: 5 bits gave the best top-1 in the same byte budget, 8 bits
# left 4 bits for most of the rest (docs/architecture.md, "The measurements behind the constants").
HEAD_FORM = "q5_0"
# With head_by_use: the output layer's rows per part (SmolLM2's 49,152: 12 parts; its first part takes most of the
# next-token probability on the calibration text) and the mark in a part's name.
HEAD_ROWS = 4096
HEAD_PART = "@"
# Added to H's diagonal, as a share of its mean: keeps the inverse stable and the compensation from fitting the
# calibration text alone. 0.1 rather than GPTQ's 0.01 or 1: the best corpus KLD and top-1, and the fine-tune's own
# answers closer to the source than with 0.01 (docs/architecture.md, "The measurements behind the constants").
DAMP = 0.1
STATISTICS_SHARE = 0.5  # of the memory this process may still use, for the H matrices held at once
GPTQ_RUN = 4096  # the fewest rows GPTQ rounds on a thread of their own (16k rows: 1.5x on 2 CPUs; 4k: none)
LAZY = 128  # columns updated together, then the rest at once (GPTQ's lazy batch)
# llama.cpp's bytes per weight of the types its Q4_K_M and Q5_K_M use, and the type a K-quant falls back to when a row
# is not a whole number of 256-weight super-blocks (llama-quant.cpp: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0).
GGML_BYTES = {
    "Q4_K": 144 / 256,
    "Q5_K": 176 / 256,
    "Q6_K": 210 / 256,
    "Q5_0": 22 / 32,
    "Q5_1": 24 / 32,
    "Q8_0": 34 / 32,
}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
RECIPES = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K"}  # llama.cpp's recipe -> the type of the weights it does not promote


def centre(form: str) -> int:
    """The code of zero in a form without a minimum (llama.cpp's Q4_0 / Q5_0: 8 / 16)."""
    return 2 ** (FORMS[form][0] - 1)


def block_params(x: np.ndarray, importance: np.ndarray | None, form: str) -> tuple[np.ndarray, np.ndarray]:
    """fp16 scale and minimum [rows, blocks] for x [rows, blocks * 32], fitted under the input channels' importance;
    a form without a minimum has -centre scales as its minimum."""
    rows = x.shape[0]
    blocks = x.reshape(rows, -1, BLOCK).astype(np.float32)
    bits, minimum = FORMS[form]
    if not minimum:
        scale = half(symmetric_scale(blocks, fit_weights(blocks, importance), centre(form)))
        return scale, -centre(form) * scale
    _, scale, low = search_blocks(blocks, fit_weights(blocks, importance), 2**bits - 1)
    return half(scale), half(low)


def symmetric_scale(x: np.ndarray, w: np.ndarray, zero: int, steps: int = 9) -> np.ndarray:
    """The scale of blocks x [..., 32] with codes -zero..zero-1 that makes the least weighted error, as llama.cpp's
    make_qx_quants: the block's largest value on the lowest code, nudged by tenths of a code, each grid's scale then
    fitted by least squares. At that scale the error is sum(w x^2) - sum(w c x)^2 / sum(w c^2), so the grid with the
    largest sum(w c x)^2 / sum(w c^2) wins (per-block sums in float64)."""
    big = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]
    safe = np.where(big != 0, big, 1.0)
    wx = w * x
    best_scale, best_gain = np.zeros(x.shape[:-1]), np.full(x.shape[:-1], -np.inf)
    codes = np.empty_like(x)
    for step in range(-steps, steps + 1):
        np.multiply(x, (-(zero + 0.1 * step) / safe)[..., None], out=codes)
        np.clip(np.rint(codes, out=codes), -zero, zero - 1, out=codes)
        sxl = dot(codes, wx).astype(np.float64)
        sl2 = np.maximum(dot(codes * codes, w), 1e-30).astype(np.float64)
        gain = sxl * sxl / sl2
        better = gain > best_gain
        best_scale, best_gain = np.where(better, sxl / sl2, best_scale), np.where(better, gain, best_gain)
    return best_scale.astype(np.float32)


def q8_0(matrix: np.ndarray) -> gguf_blocks.BlockForm:
    """8 bits, symmetric, a fp16 scale per 32 (llama.cpp's Q8_0, which the kernel holds)."""
    rows, cols = matrix.shape
    blocks = matrix.reshape(rows, -1, BLOCK).astype(np.float32)
    scale = half(np.abs(blocks).max(-1) / 127)
    safe = np.where(scale > 0, scale, 1)
    codes = (np.clip(np.rint(blocks / safe[..., None]), -127, 127) + 128).astype(np.uint8).reshape(rows, cols)
    return gguf_blocks.BlockForm("q8_0", 8, BLOCK, codes, scale, np.full(scale.shape, 128, dtype=np.uint8), None)


def rounded(matrix: np.ndarray, importance: np.ndarray | None, form: str) -> gguf_blocks.BlockForm:
    """Plain rounding to the fitted blocks, no error compensation (the estimate `allocate` uses, and the baseline
    the tests hold GPTQ against)."""
    if form == "q8_0":
        return q8_0(matrix)
    scale, low = by_row_runs(lambda rows: block_params(matrix[rows], importance, form), len(matrix), ROWS_AT_ONCE)
    return _form(_codes(matrix, scale, low, form), scale, low, form)


def _codes(x: np.ndarray, scale: np.ndarray, low: np.ndarray, form: str) -> np.ndarray:
    rows = x.shape[0]
    blocks = x.reshape(rows, -1, BLOCK) if x.ndim == 2 else x
    safe = np.where(scale != 0, scale, 1)
    codes = np.clip(np.rint((blocks - low[..., None]) / safe[..., None]), 0, 2 ** FORMS[form][0] - 1)
    return codes.reshape(rows, -1).astype(np.uint8)


def _form(codes: np.ndarray, scale: np.ndarray, low: np.ndarray, form: str) -> gguf_blocks.BlockForm:
    """The block form of codes 0..2^bits-1 (value = scale * code + low); a form without a minimum as llama.cpp's
    Q4_0 / Q5_0: its codes centred, no offset."""
    bits, minimum = FORMS[form]
    zero = np.full(scale.shape, 0 if minimum else centre(form), dtype=np.uint8)
    return gguf_blocks.BlockForm(form, 4 if bits == 4 else 8, BLOCK, codes, scale, zero, low if minimum else None)


def gptq(matrix: np.ndarray, hessian: np.ndarray, form: str) -> gguf_blocks.BlockForm:
    """matrix [rows = outputs, cols = inputs] in a 4-bit or 5-bit form, each column's rounding error compensated on the
    columns after it (Frantar et al., GPTQ), each block's scale (and minimum) fitted when the block comes up. Each
    row is rounded on its own, so long runs of rows go to the CPUs allowed."""
    if form == "q8_0":
        return q8_0(matrix)
    cols = matrix.shape[1]
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) == 0  # a channel that never carries anything: its weights do not matter
    h[dead, dead] = 1
    importance = np.diag(h).copy()
    h[np.diag_indices(cols)] += DAMP * importance.mean()
    u = error_spread(h)
    # runs of rows on the CPUs allowed where they are long (an output layer): shorter ones lose more to the GIL
    # between the loop's small steps than they gain
    codes, scale, low = by_row_runs(
        lambda rows: _gptq_rows(matrix[rows], u, importance, dead, form), len(matrix), least=GPTQ_RUN
    )
    return _form(codes, scale, low, form)


def error_spread(h: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor U of H^-1 (H^-1 = U^T U; row i holds how column i's error spreads over the columns
    after it), without inverting H: with the lower factor M of H in reversed order (J H J = M M^T), H = K K^T for the
    upper K = J M J, so U = K^-1 = J M^-1 J, a triangular inverse (an 8960-wide H in float64: 15 s, not inv and
    cholesky's 36 s; the same U to 1e-15)."""
    m = np.linalg.cholesky(h[::-1, ::-1])
    return lower_inverse(m)[::-1, ::-1]


def lower_inverse(m: np.ndarray) -> np.ndarray:
    """The inverse of a lower triangular m, by halves ([[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]):
    matrix products, a third of the work of a general inverse (numpy has no triangular one)."""
    n = len(m)
    if n <= 128:
        return np.tril(np.linalg.inv(m))  # LU leaves rounding dust above the diagonal
    k = n // 2
    a, d = lower_inverse(m[:k, :k]), lower_inverse(m[k:, k:])
    inverse = np.zeros_like(m)
    inverse[:k, :k], inverse[k:, k:] = a, d
    inverse[k:, :k] = -d @ (m[k:, :k] @ a)
    return inverse


def _gptq_rows(
    matrix: np.ndarray, u: np.ndarray, importance: np.ndarray, dead: np.ndarray, form: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, scale, low) of rows of a matrix, rounded by GPTQ with u, the upper Cholesky factor of H^-1. Held
    transposed (a column of the matrix is a contiguous row here), as the loop goes column by column."""
    w = matrix.T.astype(np.float64)  # [cols, rows], a copy
    w[dead] = 0
    cols, rows = w.shape
    codes = np.zeros((cols, rows), dtype=np.uint8)
    scale = np.zeros((rows, cols // BLOCK), dtype=np.float32)
    low = np.zeros_like(scale)
    top = 2 ** FORMS[form][0] - 1
    for start in range(0, cols, LAZY):
        end = min(start + LAZY, cols)
        part, errors = w[start:end].copy(), np.zeros((end - start, rows))
        for i in range(end - start):
            col = start + i
            if col % BLOCK == 0:
                b = col // BLOCK
                s, m = block_params(part[i : i + BLOCK].T, importance[col : col + BLOCK], form)
                scale[:, b], low[:, b] = s[:, 0], m[:, 0]
                s, m = s[:, 0].astype(np.float64), m[:, 0].astype(np.float64)
                inverse = 1 / np.where(s != 0, s, 1)
            c = np.rint((part[i] - m) * inverse)
            np.clip(c, 0, top, out=c)
            codes[col] = c
            error = (part[i] - (s * c + m)) / u[col, col]
            part[i:] -= np.outer(u[col, col:end], error)
            errors[i] = error
        w[end:] -= u[start:end, end:].T @ errors
    return codes.T, scale, low


def output_error(matrix: np.ndarray, values: np.ndarray, hessian: np.ndarray) -> float:
    """E|x (W - Q)^T|^2 / E|x W^T|^2 over the calibration text: the share of the output the rounding changes."""
    w = matrix.astype(np.float32)
    energy = ((w @ hessian.astype(np.float32)) * w).sum(dtype=np.float64)
    return float(row_errors(matrix, values, hessian).sum() / max(energy, 1e-30))


def row_errors(matrix: np.ndarray, values: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """E|x (W - Q)^T|^2 of each output row [rows] over the calibration text."""
    e = (matrix - values).astype(np.float32)
    return ((e @ hessian.astype(np.float32)) * e).sum(1, dtype=np.float64)


def allocate(
    errors: dict[str, dict[str, float]], sizes: dict[str, int], budget: float, floor: dict[str, str] | None = None
) -> dict[str, str]:
    """The form of each weight: all at their floor (the smallest form unless floor says), then changes to a larger
    form by output error removed per byte, largest first, while the bytes stay within budget. errors: name -> form
    -> output_error (inf: ruled out, never moved onto and moved off first); sizes: name -> weights; a form smaller
    than the floor's is not taken."""
    floor = floor or {}
    chosen = {name: floor.get(name, SMALLEST) for name in sizes}
    used = sum(sizes[n] * BYTES[f] for n, f in chosen.items())
    while True:
        best, gain = None, 0.0
        for name, now in chosen.items():
            for to in CHOICES:  # only to larger forms: a weight never goes below its floor
                cost = sizes[name] * (BYTES[to] - BYTES[now])
                if cost <= 0 or used + cost > budget:
                    continue
                rate = (errors[name][now] - errors[name][to]) / cost
                if rate > gain:
                    best, gain = (name, to, cost), rate
        if best is None:
            return chosen
        name, to, cost = best
        chosen[name], used = to, used + cost


def recipe_bytes(name: str, rows: int, cols: int, layers: int, recipe: str = "Q4_K_M") -> float:
    """The bytes llama.cpp's Q4_K_M (or Q5_K_M) gives this weight [rows = outputs, cols = inputs] (llama-quant.cpp):
    Q6_K for the output layer (a tied embedding is one), and for attn_v and ffn_down in the layers use_more_bits
    picks; Q4_K (Q5_K) otherwise; a row that is not whole super-blocks of 256 falls back (Q4_K -> Q5_0, Q5_K -> Q5_1,
    Q6_K -> Q8_0)."""
    layer = re.search(r"layers\.(\d+)\.", name)
    i = int(layer.group(1)) if layer else -1
    more_bits = i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2
    kind = RECIPES[recipe]
    if "lm_head" in name or "embed" in name or (more_bits and ("v_proj" in name or "down_proj" in name)):
        kind = "Q6_K"
    if cols % 256:
        kind = FALLBACK[kind]
    return rows * cols * GGML_BYTES[kind]


def keeps_more_bits(name: str) -> bool:
    """The output layer and an embedding table (a row per vocabulary entry): their error reaches the logits
    unmixed, which the output error of the other weights, diluted by the layers after them, does not show."""
    return "lm_head" in name or "embed" in name


def split_qkv(name: str, rows: int, config: dict) -> list[tuple[str, int, int]]:
    """(part name, start row, end row) of a weight: a packed QKV as its q, k and v rows (llama.cpp quantizes them
    apart), any other as itself."""
    if "qkv_proj" not in name:
        return [(name, 0, rows)]
    q = config["num_attention_heads"] * config["head_size"]
    kv = config["num_key_value_heads"] * config["head_size"]
    base = name.replace("qkv_proj", "{}_proj")
    return [(base.format("q"), 0, q), (base.format("k"), q, q + kv), (base.format("v"), q + kv, q + 2 * kv)]


class GPTQOptions(PluginOptions):
    learned_scales: int = Field(
        0,
        ge=0,
        le=5000,
        description="steps fitting the scales to the source's outputs after rounding (DWQ-like; 0: off); "
        "about 5 s each for a 135M model on 2 cores",
    )
    learned_scales_rate: float = Field(
        distill.RATE, gt=0, le=0.01, description="learning rate of the scales (a step moves a scale by about it)"
    )
    budget: Literal["Q4_K_M", "Q5_K_M"] = Field(
        "Q4_K_M", description="the llama.cpp recipe whose bytes for the same model the chosen forms stay within"
    )
    head_by_use: bool = Field(
        True,
        description="the output layer (and a tied embedding) in parts of 4096 vocabulary rows: the bytes the "
        "allocation gives it go to the parts by how much the source uses their tokens (its mean next-token "
        "probability on the calibration text), so the rows most used get the most bits",
    )
    sensitivity: Literal["output", "fisher"] = Field(
        "output",
        description="what ranks the forms under the byte budget: each layer's own output error, or the source's "
        "Fisher information (the KL each weight's rounding costs the whole model on the calibration text; a backward "
        "pass per 512 tokens: better on a general model, worse on a confident fine-tune)",
    )


class GPTQ(Quantizer):
    name = "gptq"
    description = "int4 for float sources: GPTQ rounding, Q4_0..Q8_0 blocks by measured error within Q4_K_M's bytes"
    precisions = ("int4",)
    algorithms = ("gptq",)
    cost = 6
    Options = GPTQOptions

    def check(self, request: ConvertRequest) -> str | None:
        if request.algorithm not in self.algorithms:
            return f"quantizes by --algorithm {self.algorithms[0]} only"
        if request.block_size != BLOCK:
            return f"uses blocks of {BLOCK} (the kernel's)"
        if request.keeps_adapter:
            return (
                f"{self.name} quantizes merged weights (a LoRA fed at run time stays float): use --adapter-mode merge"
            )
        return super().check(request)

    def graph_facts(self, request: ConvertRequest) -> GraphFacts:
        library = gguf_native.kernel_for(request)
        if library:
            return gguf_kernel.graph_facts(library)
        return super().graph_facts(request)

    def report(self, request: ConvertRequest, channels: dict, kernel: Path | None) -> dict:
        """What slmops-quantization.json says of every build of this quantizer."""
        return {
            "algorithm": self.algorithms[0],
            "float_channels": gguf_native.OUTLIER_CHANNELS if channels else 0,
            "kernel": str(kernel.name) if kernel else gguf_native.why_no_kernel(request),
            "calibration": str(request.calibration) if request.calibration else "shipped",
        }

    def quantize(self, fp32_dir: Path, output_dir: Path, request: ConvertRequest) -> None:
        options = options_of(self, request)
        text = calibration_text(request.calibration) if request.calibration else None
        decoder = json.loads((fp32_dir / "genai_config.json").read_text())["model"]["decoder"]
        matrices = weights_of(fp32_dir)
        asked = ["gptq.learned_scales"] if options.learned_scales else []
        asked += ["gptq.sensitivity=fisher"] if options.sensitivity == "fisher" else []
        if asked:  # refused now, not after the rounding
            need_extra("torch", "learning the scales (gptq.learned_scales) or the source's sensitivity")
            need, allowed = distill.memory_needed(matrices), available_memory()
            if need > allowed:
                raise SlmopsError(
                    f"learning the scales or the sensitivity of this model takes about {need / 1e9:.1f} GB and this "
                    f"process may use {allowed / 1e9:.1f} GB: build without --option {' or '.join(asked)}, or with "
                    "more memory"
                )
        ranking = options.sensitivity
        inputs = {w: x for w, x in calibration.matmul_inputs(fp32_dir).items() if w in matrices}
        groups = hessian_groups(inputs, {w: matrices[w].shape[1] for w in inputs}, statistics_budget(fp32_dir))

        def hessians_of(group: list[str]) -> dict[str, np.ndarray]:
            return calibration.activation_statistics(fp32_dir, text, full=True, weights=group)

        level = gguf_native.accuracy_level(request)
        kernel = gguf_native.kernel_for(request)
        # the first group's H and, from the same pass, the vocabulary's use (where the output layer goes by use)
        first, use = {}, None
        if groups and options.head_by_use:
            first, use = calibration.statistics_and_use(fp32_dir, text, weights=groups[0])
        elif groups:
            first = hessians_of(groups[0])
        plan = Plan(decoder, extra=carried_bytes(fp32_dir, matrices, kernel), recipe=options.budget, use=use)
        sensitivity = {}
        if ranking == "fisher":
            tokens = calibration.calibration_tokens(fp32_dir, text)
            found = distill.fisher(request.source_dir, matrices, tokens, allowed_cpus(), progress_count)
            if isinstance(found, str):  # said in the report; the layers' own output error ranks the forms instead
                ranking = f"output (fisher: {found})"
            else:
                sensitivity = found
        # Measure every weight's output error in each form (its group's H in memory), choose the forms under the
        # budget, then round each in its form: H kept where all of it fits in one group, measured again otherwise.
        kept, importance = {}, {}
        for i, group in enumerate(groups):
            hessians = first if i == 0 else hessians_of(group)
            for name in group:
                plan.measure(name, matrices[name], hessians[name], sensitivity.get(name))
                importance[name] = np.diag(hessians[name]).copy()
            kept = hessians if len(groups) == 1 else {}
        del first
        for name in matrices.keys() - inputs.keys():  # an embedding table of its own: no input to measure
            plan.measure(name, matrices[name], None, sensitivity.get(name))
        del sensitivity
        plan.choose()
        forms = {name: plan.forms(name, matrices[name], None) for name in matrices.keys() - inputs.keys()}
        for group in groups:
            hessians = kept or hessians_of(group)
            forms.update({name: plan.forms(name, matrices[name], hessians[name]) for name in group})
        del kept
        learned = {}
        if options.learned_scales:
            tokens = calibration.calibration_tokens(fp32_dir, text)
            learned = distill.distill(
                request.source_dir,
                matrices,
                forms,
                tokens,
                options.learned_scales,
                options.learned_scales_rate,
                threads=allowed_cpus(),
                show=progress_count,
            )
        channels = {}
        if level >= gguf_native.INTEGER_ACTIVATIONS:
            channels = calibration.outlier_channels(importance, gguf_native.OUTLIER_CHANNELS)
        report = {
            **self.report(request, channels, kernel),
            "forms": plan.chosen,
            "budget": options.budget,
            "budget_bytes": round(plan.budget),
            "bytes": round(plan.used()),
            "floor_bytes": round(plan.used(plan.floor)),  # the least it can take: over the budget of a tiny model
            "statistics_groups": len(groups),
            # weights near a grid their forms would round them back onto (a fine-tune of a 4-bit model): form -> count
            "ruled_out": dict(Counter(f for forms in plan.snapped.values() for f in forms)),
            "sensitivity": ranking,
            **({"learned_scales": learned} if learned else {}),
        }
        gguf_native.write_blocks(
            fp32_dir, output_dir, lambda name, matrix: forms.get(name, []), level, report, channels, kernel
        )


def statistics_budget(fp32_dir: Path) -> float:
    """Bytes the H matrices held at once may take: half of what this process may still use once ONNX Runtime holds
    the fp32 weights to measure them (Qwen2.5-1.5B's every H is 9.2 GB in float32 and its weights 6 GB;
    SmolLM2-135M's 0.4 GB and 0.5 GB: one group)."""
    weights = sum(f.stat().st_size for f in fp32_dir.glob("*.onnx*"))
    return max(0, available_memory() - weights) * STATISTICS_SHARE


def hessian_groups(inputs: dict[str, str], widths: dict[str, int], budget: float) -> list[list[str]]:
    """The weights (name -> its input's name, in graph order) in groups whose H (one K x K float32 per input) fit
    in budget bytes together; one group where all do. A single H over the budget makes a group of its own."""
    groups: list[list[str]] = []
    group: list[str] = []
    seen: set[str] = set()
    used = 0
    for name, x in inputs.items():
        cost = 0 if x in seen else 4 * widths[name] ** 2
        if group and cost and used + cost > budget:
            groups.append(group)
            group, seen, used = [], set(), 0
            cost = 4 * widths[name] ** 2
        group.append(name)
        seen.add(x)
        used += cost
    return groups + [group] if group else groups


class Plan:
    """The form of every weight: each weight's output error measured in every form, then the forms chosen once all
    are measured (allocate), then its blocks rounded in those forms (forms)."""

    def __init__(self, decoder: dict, extra: float = 0.0, recipe: str = "Q4_K_M", use: np.ndarray | None = None):
        self.decoder = decoder
        self.use = use  # each vocabulary entry's use (calibration.token_use), where the output layer goes by parts
        self.recipe = recipe  # the llama.cpp recipe whose bytes are the budget
        self.extra = extra  # what the folder carries beyond the weights, more than a GGUF file does
        self.errors: dict[str, dict[int, float]] = {}
        self.whole: dict[str, dict[str, float]] = {}  # the output layer by use, as one weight: form -> error
        self.snapped: dict[str, list[str]] = {}  # the forms ruled out for a weight (snaps)
        self.chosen: dict[str, int] = {}
        self.floor: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        self.budget = 0.0

    def measure(
        self, name: str, matrix: np.ndarray, h: np.ndarray | None, sensitivity: np.ndarray | None = None
    ) -> None:
        """The error of each part of the weight (q, k, v of a packed one; the output layer's parts by use) in every
        form, and its bytes in llama.cpp's recipe. The error: sum(F * dW^2) where the source's Fisher information F
        is given (sensitivity, the weight's shape: the KL the rounding costs the model), else the layer's own
        relative output error. The output layer by use also gets its error as one weight (whole)."""
        layers = self.decoder["num_hidden_layers"]
        parts = self.parts(name, matrix.shape[0])
        by_use = HEAD_PART in parts[0][0]
        energy = 0.0
        if by_use:
            self.whole[name] = dict.fromkeys(CHOICES, 0.0)
            if sensitivity is None and h is not None:
                w, h32 = np.asarray(matrix, dtype=np.float32), h.astype(np.float32)
                energy = float(((w @ h32) * w).sum(dtype=np.float64))
        for part, start, end in parts:
            rows = np.ascontiguousarray(matrix[start:end], dtype=np.float32)
            self.sizes[part] = rows.size
            self.budget += recipe_bytes(part, *rows.shape, layers, self.recipe)
            imp = None if h is None else np.diag(h)
            use = len(self.use) * self.use[start:end] if energy else None
            errors, shares, distances = {}, {}, {}
            for f in CHOICES:  # one form's values at a time: a 1.5B model's MLP weight is 55 MB in float32
                form = rounded(rows, imp, f)
                values = form.dequantize()
                distances[f] = gguf_blocks.grid_distance(rows, values, form)
                if energy:  # each row's error as often as its token is used; unweighted, its share of the whole's
                    by_row = row_errors(rows, values, h)
                    errors[f] = float((use * by_row).sum() / max(energy, 1e-30))
                    shares[f] = float(by_row.sum() / max(energy, 1e-30))
                elif sensitivity is not None:
                    errors[f] = float((sensitivity[start:end] * (rows - values) ** 2).sum(dtype=np.float64))
                elif h is None:  # no measurement (an embedding of its own): error falls with the bits
                    errors[f] = 1.0 / 2 ** (FORMS[f][0] + FORMS[f][1])
                else:
                    errors[f] = output_error(rows, values, h)
            ruled = gguf_blocks.snapping(distances)
            if ruled:
                self.snapped[part] = ruled
            for f in ruled:  # never taken: allocate moves off it first, never onto it
                errors[f] = np.inf
                if energy:
                    shares[f] = np.inf
            self.errors[part] = errors
            if by_use:  # the whole layer's: the parts' unweighted shares, or errors that add up over rows (Fisher's)
                for f in CHOICES:
                    self.whole[name][f] += (shares if energy else errors)[f]

    def parts(self, name: str, rows: int) -> list[tuple[str, int, int]]:
        """(part name, start row, end row) of a weight as measured and chosen: a packed QKV's q, k and v; the output
        layer by HEAD_ROWS vocabulary rows where its rows are ranked by use; any other whole."""
        if self.use is not None and "lm_head" in name and rows == len(self.use):
            return [(f"{name}{HEAD_PART}{s}", s, min(s + HEAD_ROWS, rows)) for s in range(0, rows, HEAD_ROWS)]
        return split_qkv(name, rows, self.decoder)

    def choose(self) -> None:
        """The forms within the budget. The output layer by use takes the bytes the allocation gives it as one
        weight, and those bytes go to its parts by use (weighted by use, its parts' errors are not on the scale of
        the other weights': measured against them, every part fell to the smallest form)."""
        self.floor = {n: HEAD_FORM for n in self.sizes if keeps_more_bits(n)}
        pieces = {name: {n: s for n, s in self.sizes.items() if n.startswith(name + HEAD_PART)} for name in self.whole}
        sizes = {n: s for n, s in self.sizes.items() if HEAD_PART not in n}
        sizes |= {name: sum(own.values()) for name, own in pieces.items()}
        errors = {n: e for n, e in self.errors.items() if n in sizes} | self.whole
        floor = {n: HEAD_FORM for n in sizes if keeps_more_bits(n)}
        self.chosen = allocate(errors, sizes, self.budget - self.extra, floor)
        for name, own in pieces.items():
            self.chosen.update(allocate(self.errors, own, sizes[name] * BYTES[self.chosen.pop(name)]))

    def used(self, forms: dict[str, str] | None = None) -> float:
        """Bytes of the weights in the chosen forms (or in forms, the smallest where it does not say)."""
        forms = forms if forms is not None else self.chosen
        return sum(self.sizes[n] * BYTES[forms.get(n, SMALLEST)] for n in self.sizes)

    def forms(
        self, name: str, matrix: np.ndarray, h: np.ndarray | None
    ) -> list[tuple[int, int, gguf_blocks.BlockForm]]:
        spans: list[tuple[int, int, str]] = []
        for part, start, end in self.parts(name, matrix.shape[0]):
            form = self.chosen.get(part, "q8_0")
            if HEAD_PART in part and spans and spans[-1][2] == form:  # one run (GPTQ rounds each row on its own)
                spans[-1] = (spans[-1][0], end, form)
            else:
                spans.append((start, end, form))
        runs = []
        for start, end, form in spans:
            rows = np.ascontiguousarray(matrix[start:end], dtype=np.float32)
            runs.append((start, end, gptq(rows, h, form) if h is not None else rounded(rows, None, form)))
        return runs


def weights_of(fp32_dir: Path) -> dict[str, np.ndarray]:
    """The weights write_blocks will ask forms for, as [rows = outputs, cols = inputs]: each MatMul's (not one an
    adapter feeds at run time) and an embedding table of its own (a tied one shares the lm_head's). Mapped from the
    build's data file, not read: a 1.5B model's weights are 6 GB in float32."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(fp32_dir / "model.onnx"), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    skip = set(runtime_fed_matmuls(model))

    def array(tensor) -> np.ndarray:
        if not uses_external_data(tensor):
            return numpy_helper.to_array(tensor)
        info = ExternalDataInfo(tensor)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        shape = tuple(tensor.dims)
        return np.memmap(fp32_dir / info.location, dtype=dtype, mode="r", offset=info.offset or 0, shape=shape)

    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.name not in skip and node.input[1] in inits:
            out[node.input[1]] = array(inits[node.input[1]]).T
        elif node.op_type == "Gather" and node.input[0] in inits:
            out[node.input[0]] = array(inits[node.input[0]])
    return {name: m for name, m in out.items() if m.ndim == 2 and m.shape[1] % BLOCK == 0}


def carried_bytes(fp32_dir: Path, matrices: dict[str, np.ndarray], kernel: Path | None) -> float:
    """Bytes the built folder holds beyond the quantized weights, less what a GGUF file holds beyond its tensors: the
    graph, RoPE caches, norms, tokenizer files, the kernel library and the outlier channels' codes, against the
    GGUF's metadata (its vocabulary: half of tokenizer.json's bytes on SmolLM2, 1.8 of 3.5 MB). Taken off the budget,
    so the folder, not just its weights, stays within the size of Q4_K_M's file."""
    weights = sum(m.size * 4 for m in matrices.values())
    codes = sum(m.shape[0] * gguf_native.OUTLIER_CHANNELS for m in matrices.values())
    tokenizer = fp32_dir / "tokenizer.json"
    metadata = tokenizer.stat().st_size / 2 if tokenizer.is_file() else 0
    # genai_config.json left out: a graph copied from the cached fp32 build carries use_every_core's setting in it, so
    # its bytes would make a build from that copy decide apart from one converted afresh
    config = fp32_dir / "genai_config.json"
    carried = dir_size(fp32_dir) - (config.stat().st_size if config.is_file() else 0)
    return carried - weights + (kernel.stat().st_size + codes if kernel else 0) - metadata


class Q8(GPTQ):
    """int8 of a float source in llama.cpp's Q8_0 bytes: every weight, the embedding and output layer included, in
    8-bit blocks of 32 with a fp16 scale (plain rounding, as llama.cpp's Q8_0), in the GGUF kernel with each MatMul's
    activation outlier channels in float. What the folder carries that a GGUF file does not (tokenizer.json, the RoPE
    tables, the outlier channels' codes, the kernel: 6 MB on SmolLM2) is won back by the decoder weights whose
    rounding costs least going to Q6_0, so the folder is no larger than Q8_0's file. The builder's int8 keeps the
    embedding in float: 271 MB for SmolLM2 where Q8_0 is 145."""

    name = "q8_0"
    description = "int8 for float sources: Q8_0 blocks in every weight, embedding and output layer included"
    precisions = ("int8",)
    algorithms = ("q8_0",)
    cost = 6
    Options = PluginOptions  # none of gptq's

    def quantize(self, fp32_dir: Path, output_dir: Path, request: ConvertRequest) -> None:
        level = gguf_native.accuracy_level(request)
        kernel = gguf_native.kernel_for(request)
        text = calibration_text(request.calibration) if request.calibration else None
        importance = calibration.activation_importance(fp32_dir, text)
        channels = gguf_native.float_channels(fp32_dir, request, level, importance)
        matrices = weights_of(fp32_dir)
        extra = carried_bytes(fp32_dir, matrices, kernel)
        smaller = q6_to_fit(matrices, importance, extra)
        report = self.report(request, channels, kernel) | {
            "carried_bytes": round(extra),
            "q6_0": sorted(smaller),
            "q6_0_bytes_saved": round(sum(matrices[n].size for n in smaller) * (BYTES["q8_0"] - BYTES["q6_0"])),
        }

        def forms_of(name: str, matrix: np.ndarray) -> list[tuple[int, int, gguf_blocks.BlockForm]]:
            if matrix.shape[1] % BLOCK:
                return []
            if name in smaller:
                return [(0, matrix.shape[0], rounded(matrix, importance[name], "q6_0"))]
            return [(0, matrix.shape[0], q8_0(matrix))]

        gguf_native.write_blocks(fp32_dir, output_dir, forms_of, level, report, channels, kernel)


def q6_to_fit(matrices: dict[str, np.ndarray], importance: dict[str, np.ndarray], extra: float) -> set[str]:
    """The decoder weights that go from Q8_0 to Q6_0 so that extra bytes are won back: all start at Q6_0, then go
    back to Q8_0 by output error removed per byte (allocate; the error relative, each input channel weighted by its
    mean square on the calibration text) while the bytes stay extra below all-Q8_0. None where even all of them would
    not win extra back (a tiny model's tokenizer outweighs its weights): then every weight stays Q8_0. The output
    layer and the embedding stay 8-bit."""
    sizes = {
        name: matrix.size
        for name, matrix in matrices.items()
        if not keeps_more_bits(name) and name in importance and matrix.shape[1] % BLOCK == 0
    }
    if extra <= 0 or sum(sizes.values()) * (BYTES["q8_0"] - BYTES["q6_0"]) < extra:
        return set()
    errors = {}
    for name in sizes:
        w, imp = np.asarray(matrices[name], dtype=np.float32), importance[name].astype(np.float32)
        energy = max(float(((w * w) @ imp).sum()), 1e-30)
        errors[name] = dict.fromkeys(CHOICES, np.inf) | {
            f: float((((w - rounded(w, imp, f).dequantize()) ** 2) @ imp).sum()) / energy for f in ("q6_0", "q8_0")
        }
    budget = sum(sizes.values()) * BYTES["q8_0"] - extra
    chosen = allocate(errors, sizes, budget, floor=dict.fromkeys(sizes, "q6_0"))
    return {name for name, form in chosen.items() if form == "q6_0"}


@hookimpl
def register_quantizers(register):
    register(GPTQ())
    register(Q8())
