"""slmops's kernel for a GGUF's own blocks: kernel/gguf_kernel.cc, an ONNX Runtime custom operator library compiled
once per platform into the slmops-kernel wheel (kernel/: CMake through scikit-build-core; `make install` installs it).
Without that wheel slmops writes MatMulNBits with float corrections instead and says why.

MatMulNBits has integer zero points only, so a Q4_1 block's float minimum costs it a float correction per projection
(docs/architecture.md, "Speed"); MatMulGGML applies the minimum inside the kernel, as llama.cpp does, reading the
weights as llama.cpp keeps them: Q4_0 to Q8_0, slmops's Q6_0, and the K-quants Q4_K, Q5_K and Q6_K (a fp16 scale per
super-block of 256 times an integer one per sub-block: MatMulNBits, one float scale per block, holds d x sc in float32
and Q6_K's 6-bit codes as 8-bit ones). The weights stay exactly the GGUF's: `form_of` reads back what `grouped` wrote.

The library chooses its code when loaded: AVX2 kernels on an x86-64 CPU with AVX2, FMA and F16C; on ARM64 NEON ones,
with SDOT where the CPU has dotprod; plain C++ elsewhere: the same products, bit for bit, so a folder that carries it
runs on every CPU of its architecture with the same logits."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path

import numpy as np

from slmops.api import REQUIRES, GraphFacts, write_json_atomic
from slmops.plugins import gguf_blocks

LIBRARY = "libslmops_gguf.so"
DOMAIN = "ai.slmops"
MATMUL, GATHER = "MatMulGGML", "GatherGGML"
ATTENTION = "GroupQueryAttentionF16KV"  # ONNX Runtime's GroupQueryAttention with the KV cache in fp16
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 2, 3, 6, 7, 8  # GGML's type numbers, the ggml_type attribute
Q4_K, Q5_K, Q6_K = 12, 13, 14  # the K-quants: super-blocks of 256 (gguf_kernel.cc: their layout)
Q6_0 = 100  # not a GGML type: slmops's 6-bit form (codes centred on 32, a fp16 scale per 32: 6.5 bits per weight)
K_QUANTS = {"Q4_K": Q4_K, "Q5_K": Q5_K, "Q6_K": Q6_K}
CENTRE = {Q4_0: 8, Q5_0: 16, Q6_0: 32}  # the code of zero in a type without a minimum
MINIMUM = (Q4_1, Q5_1)  # the types with a fp16 minimum per block
HIGH_BITS = {Q5_0: 1, Q5_1: 1, Q6_0: 2, Q5_K: 1, Q6_K: 2}  # code bits above the low nibble: 32-bit planes per block
COLUMNS, BLOCK = 8, 32  # output columns interleaved per group; weights per block
SUPER = gguf_blocks.SUPER_BLOCK  # a K-quant's super-block: 8 blocks
SWITCH = "SLMOPS_GGUF_KERNEL"  # "0": never use the kernel (MatMulNBits with corrections)
PRETEND_CPU = "SLMOPS_KERNEL_CPU"  # "baseline": the library runs its portable code as on a CPU without AVX2 (tests)
WHEEL = "slmops-kernel"
MEASURED = ("avx2",)  # kernels measured faster than MatMulNBits: builds here use the kernel only where it runs these


def installed() -> Path | None:
    """The library of the installed slmops-kernel wheel, or None."""
    try:
        import slmops_kernel
    except ImportError:
        return None
    path = slmops_kernel.path()
    return path if path.is_file() else None


def why_not() -> str | None:
    """Why a build here gets no kernel, or None if it does."""
    if os.environ.get(SWITCH) == "0":
        return f"{SWITCH}=0"
    path = installed()
    if path is None:
        return f"the {WHEEL} wheel is not installed (make install, or pip install ./kernel)"
    architecture = built_for(path)
    if platform.system() != "Linux" or architecture != normal_machine(platform.machine()):
        return f"the installed kernel is for Linux {architecture}, this is {platform.system()} {platform.machine()}"
    found = code(path)  # the library's own choice of kernels for this CPU
    if found == "portable":  # plain C++: slower here than MatMulNBits
        return "this CPU lacks AVX2, FMA or F16C, which the kernel's fast code needs"
    if found not in MEASURED:
        return f"the kernel's {found} code gives the x86 products exactly but is not yet measured against MatMulNBits"
    return None


def library() -> Path | None:
    """The kernel library a build on this machine carries, or None (why_not says why)."""
    return None if why_not() else installed()


def normal_machine(name: str) -> str:
    return {"AMD64": "x86_64", "arm64": "aarch64", "ARM64": "aarch64"}.get(name, name)


def built_for(path: Path) -> str | None:
    """The CPU architecture the library is built for (its ELF header)."""
    import slmops_kernel

    return slmops_kernel.machine(path)


def code(path: Path) -> str:
    """Which kernels the library runs on this CPU: "avx2", "neon", "neon-dotprod" or "portable" (it asks the CPU
    itself; SLMOPS_KERNEL_CPU)."""
    lib = ctypes.CDLL(str(path))
    lib.SlmopsKernelCode.restype = ctypes.c_char_p
    return lib.SlmopsKernelCode().decode()


@functools.cache
def _identity(path: str, size: int, mtime: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def identity(path: Path) -> str:
    """The library's own bytes, hashed (asked once per file version): the build cache key holds it."""
    st = path.stat()
    return _identity(str(path), st.st_size, st.st_mtime_ns)


# GGUF types whose blocks the kernel holds as they are
TAKES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


def takes(gguf_path: Path) -> bool:
    """Whether a GGUF file has 2-D tensors of a type the kernel holds."""
    import gguf

    return any(len(t.shape) == 2 and t.tensor_type.name in TAKES for t in gguf.GGUFReader(str(gguf_path)).tensors)


def ggml_type(form: gguf_blocks.BlockForm) -> int | None:
    """The kernel's type for a block form it holds exactly (4-bit or 5-bit codes with a fp16 scale per 32, and a fp16
    minimum (Q4_1, Q5_1) or none (Q4_0, Q5_0); 6-bit codes centred on 32 (Q6_0); Q8_0; a K-quant's own scales over
    whole super-blocks), else None."""
    if form.k is not None:
        whole = not form.codes.shape[0] % COLUMNS and not form.codes.shape[1] % SUPER
        return K_QUANTS.get(form.gguf_type) if whole else None
    if form.block != BLOCK or form.codes.shape[0] % COLUMNS or form.codes.shape[1] % BLOCK:
        return None
    if not _half_exact(form.scales):
        return None
    if form.bits == 4 and form.offsets is not None and not form.zero_points.any() and _half_exact(form.offsets):
        return Q4_1
    if form.bits == 4 and form.offsets is None and (form.zero_points == 8).all():
        return Q4_0
    if form.bits == 8 and form.offsets is None and (form.zero_points == 128).all():
        return Q8_0
    if form.bits == 8 and form.codes.max(initial=0) < 32:  # 5-bit codes, carried as 8-bit ones (gguf_blocks.FORMS)
        if form.offsets is not None and not form.zero_points.any() and _half_exact(form.offsets):
            return Q5_1
        if form.offsets is None and (form.zero_points == 16).all():
            return Q5_0
    if form.bits == 8 and form.codes.max(initial=0) < 64 and form.offsets is None and (form.zero_points == 32).all():
        return Q6_0
    return None


def _half_exact(values: np.ndarray) -> bool:
    return bool(np.array_equal(values.astype(np.float16).astype(np.float32), values))


def _group(a: np.ndarray) -> np.ndarray:
    """[rows, n, bytes] -> [rows / 8, n, 8 * bytes]: the 8 rows of a group side by side."""
    rows, n = a.shape[:2]
    return a.reshape(rows // COLUMNS, COLUMNS, n, -1).transpose(0, 2, 1, 3).reshape(rows // COLUMNS, n, -1)


def _ungroup(a: np.ndarray, width: int) -> np.ndarray:
    """The inverse of _group for fields of `width` bytes per row: [groups, n, 8 * width] -> [rows, n, width]."""
    groups, n = a.shape[:2]
    a = np.ascontiguousarray(a)
    return a.reshape(groups, n, COLUMNS, width).transpose(0, 2, 1, 3).reshape(groups * COLUMNS, n, width)


def _planes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Code bits 4.. of each block of 32 as 32-bit planes (bit j: code j), one row's planes side by side."""
    planes = [
        (((codes >> bit) & 1).astype(np.uint32) << np.arange(BLOCK, dtype=np.uint32)).sum(-1, dtype=np.uint32)
        for bit in range(4, 4 + bits)
    ]
    rows, blocks = codes.shape[:2]
    return np.stack(planes, axis=-1).astype("<u4").view(np.uint8).reshape(rows, blocks, 4 * bits)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """The low 4 bits of code j in the low nibble of byte j, of code j + 16 in the high one, per block of 32."""
    return ((codes[..., :16] & 15) | ((codes[..., 16:] & 15) << 4)).astype(np.uint8)


def _codes(nibbles: np.ndarray, planes: np.ndarray | None) -> np.ndarray:
    """The inverse of _nibbles and _planes: [rows, blocks, 32] codes."""
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)
    if planes is not None:
        planes = np.ascontiguousarray(planes).view("<u4")
        for i in range(planes.shape[-1]):
            codes = codes | (((planes[..., i : i + 1] >> np.arange(BLOCK, dtype=np.uint32)) & 1) << (4 + i)).astype(
                np.uint8
            )
    return codes.astype(np.uint8)


def _grouped_k(form: gguf_blocks.BlockForm, kind: int) -> np.ndarray:
    """A K-quant in the kernel's layout, uint8 [rows / 8, super-blocks, bytes] (gguf_kernel.cc)."""
    rows, cols = form.codes.shape
    supers, blocks = cols // SUPER, cols // BLOCK
    half = lambda a: a.astype(np.float16).view(np.uint8).reshape(rows, supers, 2)  # noqa: E731
    head = [half(form.k.d)] + ([half(form.k.dmin)] if kind != Q6_K else [])
    codes = form.codes.reshape(rows, blocks, BLOCK)
    if kind == Q6_K:  # two int8 scales per block: the first sub-block's 8 columns, then the second's
        sc = form.k.sc.astype(np.int8).view(np.uint8).reshape(rows, blocks, 2)
        scales = [sc[..., :1], sc[..., 1:]]
    else:
        scales = [
            form.k.sc.astype(np.uint8).reshape(rows, blocks, 1),
            form.k.m.astype(np.uint8).reshape(rows, blocks, 1),
        ]
    parts = scales + ([_planes(codes, HIGH_BITS[kind])] if kind in HIGH_BITS else []) + [_nibbles(codes)]
    per_block = np.concatenate([_group(p) for p in parts], axis=-1)  # [groups, blocks, block bytes]
    per_super = per_block.reshape(rows // COLUMNS, supers, -1)
    return np.ascontiguousarray(np.concatenate([_group(h) for h in head] + [per_super], axis=-1))


def _form_of_k(weight: np.ndarray, kind: int) -> gguf_blocks.BlockForm:
    groups, supers, _ = weight.shape
    rows, blocks, high = groups * COLUMNS, supers * SUPER // BLOCK, HIGH_BITS.get(kind, 0)
    head = 2 * COLUMNS * (1 if kind == Q6_K else 2)
    f16 = lambda a: _ungroup(a, 2).copy().view(np.float16)[..., 0].astype(np.float32)  # noqa: E731
    d = f16(weight[..., : 2 * COLUMNS])
    per_block = np.ascontiguousarray(weight[..., head:]).reshape(groups, blocks, -1)
    field = lambda start, width: _ungroup(per_block[..., COLUMNS * start : COLUMNS * (start + width)], width)  # noqa: E731
    planes = field(2, 4 * high) if high else None
    codes = _codes(field(2 + 4 * high, 16), planes)
    if kind == Q6_K:
        sc = np.concatenate([field(0, 1), field(1, 1)], axis=-1).view(np.int8).astype(np.int16).reshape(rows, -1)
        k = gguf_blocks.KScales(d, sc)
        scales = np.repeat(d, SUPER // 16, axis=1) * sc.astype(np.float32)
        zero = np.full(scales.shape, 32, dtype=np.uint8)
        return gguf_blocks.BlockForm("Q6_K", 8, 16, codes.reshape(rows, -1), scales, zero, None, k)
    sc, m = field(0, 1).reshape(rows, -1).astype(np.int16), field(1, 1).reshape(rows, -1).astype(np.int16)
    dmin = f16(weight[..., 2 * COLUMNS : 4 * COLUMNS])
    k = gguf_blocks.KScales(d, sc, dmin, m)
    scales = np.repeat(d, SUPER // BLOCK, axis=1) * sc.astype(np.float32)
    offsets = -(np.repeat(dmin, SUPER // BLOCK, axis=1) * m.astype(np.float32))
    zero = np.zeros(scales.shape, dtype=np.uint8)
    name = "Q4_K" if kind == Q4_K else "Q5_K"
    return gguf_blocks.BlockForm(
        name, 4 if kind == Q4_K else 8, BLOCK, codes.reshape(rows, -1), scales, zero, offsets, k
    )


def grouped(form: gguf_blocks.BlockForm, kind: int) -> np.ndarray:
    """The form in the kernel's layout, uint8 [rows / 8, blocks, bytes]: for each group of 8 rows (outputs) and each
    block, the 8 fp16 scales, (Q4_1, Q5_1) the 8 fp16 minimums, (Q5_0, Q5_1, Q6_0) each row's fifth bits (4 bytes,
    bit j of code j) and (Q6_0) then its sixth bits, then each row's codes (Q4_0 to Q6_0: 16 bytes, the low 4 bits of
    code j in the low nibble of byte j and of code j + 16 in the high one; Q8_0: 32 int8). The K-quants: uint8
    [rows / 8, super-blocks, bytes] (_grouped_k)."""
    if kind in K_QUANTS.values():
        return _grouped_k(form, kind)
    rows, cols = form.codes.shape
    blocks = cols // BLOCK
    half = lambda a: a.astype(np.float16).view(np.uint8).reshape(rows, blocks, 2)  # noqa: E731
    codes = form.codes.reshape(rows, blocks, BLOCK)
    if kind != Q8_0:
        parts = [half(form.scales)] + ([half(form.offsets)] if kind in MINIMUM else [])
        if kind in HIGH_BITS:
            parts.append(_planes(codes, HIGH_BITS[kind]))
        parts.append(_nibbles(codes))
    else:
        parts = [half(form.scales), (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
    return np.ascontiguousarray(np.concatenate([_group(p) for p in parts], axis=-1))


def outlier_codes(form: gguf_blocks.BlockForm, kind: int, channels: np.ndarray) -> np.ndarray:
    """The codes of the outlier channels (input columns, sorted), uint8 [rows / 8, channels, 8]: the kernel multiplies
    those channels in float, reading their scales from the blocks and their codes from here (1 byte each)."""
    codes = form.codes[:, channels]
    if kind in (Q8_0, Q6_K):  # signed codes, centred (the kernel holds no minimum for these)
        codes = (codes.astype(np.int16) - (128 if kind == Q8_0 else 32)).astype(np.int8).view(np.uint8)
    rows = codes.shape[0]
    return np.ascontiguousarray(codes.reshape(rows // COLUMNS, COLUMNS, -1).transpose(0, 2, 1))


def form_of(weight: np.ndarray, kind: int) -> gguf_blocks.BlockForm:
    """The block form a grouped weight holds (what read_back dequantizes)."""
    if kind in K_QUANTS.values():
        return _form_of_k(weight, kind)
    groups, blocks, _ = weight.shape
    rows = groups * COLUMNS
    half = lambda a: _ungroup(a, 2).copy().view(np.float16)[..., 0].astype(np.float32)  # noqa: E731
    scales = half(weight[..., : 2 * COLUMNS])
    if kind == Q8_0:
        codes = _ungroup(weight[..., 2 * COLUMNS :], BLOCK).view(np.int8).astype(np.int16) + 128
        zero = np.full(scales.shape, 128, dtype=np.uint8)
        return gguf_blocks.BlockForm("", 8, BLOCK, codes.reshape(rows, -1).astype(np.uint8), scales, zero, None)
    head = 4 * COLUMNS if kind in MINIMUM else 2 * COLUMNS  # the scales (and the minimums)
    minimum = half(weight[..., 2 * COLUMNS : head]) if kind in MINIMUM else None
    high = HIGH_BITS.get(kind, 0)
    start = head + 4 * COLUMNS * high
    planes = _ungroup(weight[..., head:start], 4 * high) if high else None
    codes = _codes(_ungroup(weight[..., start:], 16), planes)
    zero = np.full(scales.shape, CENTRE.get(kind, 0), dtype=np.uint8)
    bits = 4 if kind in (Q4_0, Q4_1) else 8
    return gguf_blocks.BlockForm("", bits, BLOCK, codes.reshape(rows, -1), scales, zero, minimum)


def graph_facts(library: Path) -> GraphFacts:
    """What a build on this kernel holds, for the build cache key: its operator and which library it carries (its
    bytes, hashed), so a folder carrying another library is built anew, not reused. (Its attention too where the
    graph's is one the kernel computes, which only the graph says: swap_attention.)"""
    return {"ops": [MATMUL], "kernel": identity(library)}


# GroupQueryAttention's attributes the kernel's attention computes; the others must have these values (its default)
ATTENTION_ATTRIBUTES = {"num_heads", "kv_num_heads", "scale", "do_rotary", "rotary_interleaved"}
ATTENTION_DEFAULTS = {"local_window_size": -1, "softcap": 0.0, "smooth_softmax": 0, "qk_output": 0}
ATTENTION_INPUTS = 9  # query, key, value, past key, past value, seqlens_k, total_sequence_length, cos, sin
KV_NAMES = ("past_key_values.", "present.")


def swap_attention(model) -> int:
    """Every GroupQueryAttention node of the graph (onnx ModelProto, changed in place) becomes the kernel's, which
    keeps the KV cache in fp16 (half the bytes each decoded token reads: the cost of a long context on a CPU is that
    read), and the graph's past_key_values / present tensors become fp16 (ONNX Runtime GenAI allocates its cache
    from their type). All or none: a graph with one node the kernel does not compute (a sliding window, a softcap,
    position ids or an attention bias given, another KV type) keeps ONNX Runtime's everywhere. Returns the nodes
    swapped."""
    from onnx import TensorProto, helper

    nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]
    kv = [v for v in [*model.graph.input, *model.graph.output] if v.name.startswith(KV_NAMES)]

    def plain(node) -> bool:
        values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        extra = {k: v for k, v in values.items() if k not in ATTENTION_ATTRIBUTES}
        return all(ATTENTION_DEFAULTS.get(k, object()) == v for k, v in extra.items()) and not any(
            node.input[ATTENTION_INPUTS:]
        )

    if not nodes or not kv or not all(map(plain, nodes)):
        return 0
    if any(v.type.tensor_type.elem_type != TensorProto.FLOAT for v in kv):
        return 0
    for node in nodes:
        keep = [a for a in node.attribute if a.name in ATTENTION_ATTRIBUTES]
        node.ClearField("attribute")
        node.attribute.extend(keep)
        inputs = list(node.input[:ATTENTION_INPUTS])
        while inputs and not inputs[-1]:
            inputs.pop()
        node.ClearField("input")
        node.input.extend(inputs)
        node.op_type, node.domain = ATTENTION, DOMAIN
    for value in [*kv, *(v for v in model.graph.value_info if v.name.startswith(KV_NAMES))]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return len(nodes)


def carry(library: Path, model_dir: Path) -> None:
    """Put the library in the model folder and name it in genai_config.json (ONNX Runtime GenAI and Foundry Local
    load it from there). The kernel runs on ONNX Runtime's intra-op threads, so the folder sets ONNX Runtime's own
    default (0: one per physical core) as any other build does; a session's thread setting covers both."""
    shutil.copyfile(library, model_dir / LIBRARY)
    write_json_atomic(
        model_dir / REQUIRES,
        {
            "what": f"the slmops GGUF kernel ({LIBRARY})",
            "os": "Linux",
            "machine": [built_for(library)],
            "cpu_flags": [],
        },
    )
    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    kernel_options = {"custom_ops_library": LIBRARY, "intra_op_num_threads": 0}
    for key in kernel_options:  # last, in this order, whether the graph's own config set them or not: one build,
        options.pop(key, None)  # one file (a quantized build of a cached fp32 graph wrote them the other way round)
    options.update(kernel_options)
    write_json_atomic(path, config)
