"""A GGUF's quantized tensors read as block forms the ONNX Runtime kernels take as they are:
value = scale * (code - zero_point) + offset, integer codes per element, scale/zero point/offset per block.

Every type below is affine in its codes within a block, so its blocks carry over without quantizing again:
the codes come from the GGUF's own dequantization, and ``exact`` checks that the form gives back exactly the
values gguf-py dequantizes (float32, bit for bit)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# GGUF type -> (code bits the runtime needs, elements per block, zero point, has an offset per block)
# Q5 codes (0..31) and Q6_K codes (0..63) travel as 8-bit codes: still exact, twice the bytes of 4-bit.
FORMS = {
    "Q4_0": (4, 32, 8, False),
    "Q4_1": (4, 32, 0, True),
    "Q5_0": (8, 32, 16, False),
    "Q5_1": (8, 32, 0, True),
    "Q8_0": (8, 32, 128, False),
    "Q4_K": (4, 32, 0, True),
    "Q5_K": (8, 32, 0, True),
    "Q6_K": (8, 16, 32, False),
}
SUPPORTED = tuple(FORMS)
SUPER_BLOCK = 256  # weights per K-quant super-block (QK_K)
K_TYPES = ("Q4_K", "Q5_K", "Q6_K")


@dataclass
class KScales:
    """A K-quant's two-level scales, as the GGUF stores them: per super-block of 256 a fp16 scale d (and, Q4_K and
    Q5_K, a fp16 dmin), per sub-block an integer scale sc (Q4_K, Q5_K: 6-bit, sub-blocks of 32; Q6_K: int8, of 16)
    and (Q4_K, Q5_K) a 6-bit minimum m. The form's scale is d * sc and its offset -(dmin * m), in float32 as gguf-py
    computes them; the kernel keeps d and sc apart so its bytes stay the GGUF's."""

    d: np.ndarray  # float32 [rows, super-blocks], fp16-exact
    sc: np.ndarray  # int16 [rows, sub-blocks]
    dmin: np.ndarray | None = None  # float32 [rows, super-blocks]
    m: np.ndarray | None = None  # int16 [rows, sub-blocks]

    def take(self, rows: np.ndarray) -> KScales:
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return KScales(self.d[rows], self.sc[rows], pick(self.dmin), pick(self.m))

    @staticmethod
    def stack(parts: list[KScales]) -> KScales:
        def cat(attr: str) -> np.ndarray | None:
            arrays = [getattr(p, attr) for p in parts]
            return None if arrays[0] is None else np.concatenate(arrays)

        return KScales(cat("d"), cat("sc"), cat("dmin"), cat("m"))


@dataclass
class BlockForm:
    """One matrix [rows, cols] as blocks along each row (cols is the input dimension of a MatMul)."""

    gguf_type: str
    bits: int
    block: int
    codes: np.ndarray  # uint8 [rows, cols]
    scales: np.ndarray  # float32 [rows, cols // block]
    zero_points: np.ndarray  # uint8 [rows, cols // block]
    offsets: np.ndarray | None  # float32 [rows, cols // block], added after the scaled code; None: no offset
    k: KScales | None = None  # a K-quant's scales as the GGUF holds them (scales and offsets are made from them)

    def dequantize(self) -> np.ndarray:
        """The values this form stands for, in float32 as the GGUF computes them."""
        rows, cols = self.codes.shape
        c = self.codes.reshape(rows, -1, self.block).astype(np.float32) - self.zero_points[..., None].astype(np.float32)
        v = self.scales[..., None] * c
        if self.offsets is not None:
            v = v + self.offsets[..., None]
        return v.reshape(rows, cols).astype(np.float32)

    def take(self, rows: np.ndarray) -> BlockForm:
        off = None if self.offsets is None else self.offsets[rows]
        k = None if self.k is None else self.k.take(rows)
        return BlockForm(
            self.gguf_type, self.bits, self.block, self.codes[rows], self.scales[rows], self.zero_points[rows], off, k
        )


def _params(gguf_type: str, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, KScales | None]:
    """(scale, offset, K-quant scales) per block from the raw GGUF blocks [n, bytes_per_block]; one row per GGUF
    block, one column per sub-block of FORMS' block size."""
    from gguf.quants import Q4_K

    f16 = lambda b: b.copy().view(np.float16).astype(np.float32)  # noqa: E731 (fp16 fields of a block)
    if gguf_type in ("Q4_0", "Q5_0", "Q8_0"):
        return f16(raw[:, 0:2]), None, None
    if gguf_type in ("Q4_1", "Q5_1"):
        return f16(raw[:, 0:2]), f16(raw[:, 2:4]), None
    if gguf_type in ("Q4_K", "Q5_K"):
        d, dmin = f16(raw[:, 0:2]), f16(raw[:, 2:4])
        sc, m = Q4_K.get_scale_min(raw[:, 4:16].copy())
        k = KScales(d, sc.astype(np.int16), dmin, m.astype(np.int16))
        return d * sc.astype(np.float32), -(dmin * m.astype(np.float32)), k
    if gguf_type == "Q6_K":
        d, scales = f16(raw[:, 208:210]), raw[:, 192:208].copy().view(np.int8)
        return d * scales.astype(np.float32), None, KScales(d, scales.astype(np.int16))
    raise ValueError(gguf_type)


def block_form(gguf_type: str, raw: np.ndarray, values: np.ndarray) -> BlockForm:
    """The block form of one GGUF tensor: raw blocks [rows, bytes], values: gguf-py's dequantization [rows, cols]."""
    bits, block, zp, has_offset = FORMS[gguf_type]
    rows, cols = values.shape
    per_row = raw.shape[1] // (cols // (SUPER_BLOCK if gguf_type in K_TYPES else 32))
    scale, offset, k = _params(gguf_type, raw.reshape(-1, per_row))
    scale = scale.reshape(rows, cols // block)
    offset = None if offset is None else offset.reshape(rows, cols // block)
    if k is not None:
        shape = lambda a, n: None if a is None else a.reshape(rows, n)  # noqa: E731
        supers = cols // SUPER_BLOCK
        k = KScales(shape(k.d, supers), shape(k.sc, cols // block), shape(k.dmin, supers), shape(k.m, cols // block))
    v = values.reshape(rows, -1, block).astype(np.float64)
    shifted = v - (offset[..., None] if offset is not None else 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scale[..., None] == 0, 0.0, np.rint(shifted / scale[..., None]))
    codes = (q + zp).clip(0, 2**bits - 1).astype(np.uint8).reshape(rows, cols)
    zero_points = np.full(scale.shape, zp, dtype=np.uint8)
    return BlockForm(gguf_type, bits, block, codes, scale.astype(np.float32), zero_points, offset, k)


def row_key(row: np.ndarray) -> bytes:
    """A row's identity: the exact float32 bytes, hashed (the dequantized checkpoint holds the same values)."""
    return hashlib.blake2b(np.ascontiguousarray(row, dtype=np.float32).tobytes(), digest_size=16).digest()


def index_rows(rows: dict[bytes, tuple[str, int]], name: str, matrix: np.ndarray) -> None:
    """Add each row of matrix to rows (row_key -> (name, row)); a row seen before keeps its first place."""
    for i in range(matrix.shape[0]):
        rows.setdefault(row_key(matrix[i]), (name, i))


def half(a: np.ndarray) -> np.ndarray:
    """Values as a block's fp16 field holds them, in float32."""
    return a.astype(np.float16).astype(np.float32)


@dataclass
class GGUFWeights:
    """The quantized 2-D tensors of a GGUF file, findable by the exact values of any of their rows."""

    forms: dict[str, BlockForm]  # tensor name -> block form
    rows: dict[bytes, tuple[str, int]]  # row_key -> (tensor name, row)
    other_types: dict[str, str]  # tensor name -> type, for 2-D tensors with no exact form here


def read(path: Path) -> GGUFWeights:
    import gguf

    reader = gguf.GGUFReader(str(path))
    forms: dict[str, BlockForm] = {}
    rows: dict[bytes, tuple[str, int]] = {}
    other: dict[str, str] = {}
    for t in reader.tensors:
        if len(t.shape) != 2:
            continue
        name, kind = t.name, t.tensor_type.name
        if kind not in FORMS:
            other[name] = kind
            continue
        values = gguf.quants.dequantize(t.data, t.tensor_type)  # [rows, cols], float32
        form = block_form(kind, np.asarray(t.data), values)
        if not np.array_equal(form.dequantize(), values):  # never expected; a wrong form must not pass as exact
            other[name] = kind
            continue
        forms[name] = form
        index_rows(rows, name, values)
    return GGUFWeights(forms, rows, other)


# A float source fine-tuned from a 4-bit model (the dequantized GGUF it came as, or a LoRA merged onto one) lies
# within a fraction of a step of its base's blocks: SmolLM2's fine-tune of the dequantized Q4_1 default moved no weight
# by half a Q4_1 step. A form that fits that grid again rounds each weight back to its base value, undoing the
# fine-tune while its measured error looks the smallest (q4_1 and q5_1 kept a small share of the fine-tune's change:
# docs/architecture.md, "The measurements behind the constants"). Such a form is ruled out for that weight. The mean
# distance of the weights to a form's grid, in its steps, tells it: far from 0 for a float model (uniform), close to 0
# where the form snaps, 0 exactly on the grid (the base itself: nothing to undo, nothing ruled out). gptq rules such a
# form out for the weight, imatrix (one form) keeps that weight at 8 bits.
SNAPS = (1e-3, 0.1)


def grid_distance(matrix: np.ndarray, values: np.ndarray, form: BlockForm) -> float:
    """The mean distance of matrix's weights to values (form.dequantize(), form rounded from matrix), in form's
    steps."""
    step = np.repeat(np.abs(form.scales), form.block, axis=1)
    return float((np.abs(matrix - values) / np.where(step > 0, step, 1)).mean())


def snapping(distances: dict[str, float]) -> list[str]:
    """The forms that would round a weight back onto a grid it lies near but not on (SNAPS), given each form's
    grid_distance; none where one form holds it exactly (it is that grid's own model)."""
    if min(distances.values()) <= SNAPS[0]:
        return []
    return [f for f, d in distances.items() if d < SNAPS[1]]
