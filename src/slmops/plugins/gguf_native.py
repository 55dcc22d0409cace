"""Quantizer: a GGUF source at its own quantization. The fp32 graph's weights are the GGUF's dequantized values;
each MatMul (and the embedding) gets the GGUF's own blocks back instead of a second, lossy quantization.

A block's value is scale * (code - zero_point) + offset. MatMulNBits takes the first part as it is; an offset per
block (Q4_1, Q4_K, Q5_1, Q5_K keep a minimum) is added exactly by y += blocksum(x) @ offsets, where blocksum(x) sums
x over each block of the input dimension: the same trick llama.cpp's Q4_1 dot product uses. Weights of types with no
exact form here (or not found in the GGUF) take 8-bit RTN, and slmops-quantization.json says which.

At accuracy level 4 (int8 activations, the default) each MatMul's largest activation channels, measured on
calibration text, skip the int8 rounding: zeroed in what MatMulNBits reads, multiplied in float by their rows.

Both corrections are one small float product per projection: y += side @ [offsets; outlier rows], where the side
[blocksum(inliers), outliers] is made once per input (docs/architecture.md: what each costs at decode).

Where slmops's GGUF kernel runs (gguf_kernel: its wheel installed, x86-64 with AVX2), the Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0 weights, and the Q4_K, Q5_K, Q6_K ones whose rows are whole super-blocks of 256, go to it instead:
MatMulGGML keeps llama.cpp's blocks (a K-quant's two-level scales as they are) and applies the minimum and the outlier
channels inside the kernel, with no correction nodes."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np

from slmops.api import (
    MODEL_FILES,
    ConvertRequest,
    GraphFacts,
    Quantizer,
    calibration_text,
    copy_tree,
    hookimpl,
    native_code_for,
    runtime_fed_matmuls,
    write_json_atomic,
)
from slmops.plugins import calibration, gguf_blocks, gguf_kernel

REPORT = "slmops-quantization.json"
PLANES = "planes"  # doc_string of the Add that sums an 8-bit weight's two 4-bit planes
# doc_string of the Add of a MatMulNBits' float correction, "correction:B": the first B rows of its matrix are the
# block offsets (B = 0: none), the rest the outlier channels' rows
CORRECTION = "correction"
PACKED = ";"  # separates the weights one packed MatMulNBits holds in its doc_string
INTEGER_ACTIVATIONS = 4  # MatMulNBits accuracy level 4: int8 activations (one scale per block), the integer kernel
# Input channels per MatMul kept in float at level 4: 8 takes mean KLD to a quarter of llama.cpp's own on the same
# file, more gain little and cost decode time (docs/architecture.md, "The measurements behind the constants").
# (The guide's question is a near tie in the source that int8 activations decide either way, float order included:
# docs/user-guide.md, section 2.)
OUTLIER_CHANNELS = 8


def pack(codes: np.ndarray, bits: int, block: int) -> np.ndarray:
    """MatMulNBits' B: [rows, blocks, block * bits / 8], two 4-bit codes a byte with the even one low."""
    rows, cols = codes.shape
    if bits == 8:
        return codes.reshape(rows, cols // block, block)
    pairs = codes.reshape(rows, cols // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8).reshape(rows, cols // block, block // 2)


def pack_zero_points(zp: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return zp
    rows, n = zp.shape
    padded = np.zeros((rows, n + n % 2), dtype=np.uint8)
    padded[:, :n] = zp
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8)


def unpack(b: np.ndarray, zp: np.ndarray, bits: int, cols: int, blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes [rows, cols], zero points [rows, blocks]) back from B (or a gathered table) and its zero points."""
    rows = b.shape[0]
    flat, z = b.reshape(rows, -1), zp.reshape(rows, -1)
    if bits == 8:
        return flat[:, :cols], z[:, :blocks]
    nibbles = lambda x: np.stack([x & 0x0F, x >> 4], axis=-1).reshape(rows, -1)  # noqa: E731 (even one low)
    return nibbles(flat)[:, :cols], nibbles(z)[:, :blocks]


def rtn8(matrix: np.ndarray, block: int = 32) -> gguf_blocks.BlockForm:
    """The nearest 8-bit form of float rows (symmetric, per block), for weights the GGUF gives no exact form."""
    rows, cols = matrix.shape
    blocks = matrix.reshape(rows, -1, block).astype(np.float32)
    scale = np.abs(blocks).max(axis=-1) / 127
    safe = np.where(scale == 0, 1, scale)
    codes = (np.rint(blocks / safe[..., None]) + 128).clip(0, 255).astype(np.uint8).reshape(rows, cols)
    return gguf_blocks.BlockForm(
        "rtn8", 8, block, codes, scale.astype(np.float32), np.full(scale.shape, 128, dtype=np.uint8), None
    )


def nibble_planes(form: gguf_blocks.BlockForm) -> list[gguf_blocks.BlockForm]:
    """An 8-bit form as two exact 4-bit forms that add up to it: code c = 16*hi + lo and zero point z = 16*zh + zl
    give scale*(c - z) = 16*scale*(hi - zh) + scale*(lo - zl). ONNX Runtime 1.31 has a fast float-activation kernel
    for 4-bit MatMulNBits only (8-bit at float activations is dozens of times slower: docs/architecture.md, "The
    measurements behind the constants"), so float activations take
    8-bit weights this way. The offset, if any, stays with the whole."""
    if form.bits != 8:
        return [form]
    hi = gguf_blocks.BlockForm(
        form.gguf_type, 4, form.block, form.codes >> 4, form.scales * 16, form.zero_points >> 4, None
    )
    lo = gguf_blocks.BlockForm(form.gguf_type, 4, form.block, form.codes & 15, form.scales, form.zero_points & 15, None)
    return [hi, lo]


def join_planes(hi: gguf_blocks.BlockForm, lo: gguf_blocks.BlockForm) -> gguf_blocks.BlockForm:
    """The 8-bit form two planes were cut from (read_back): the codes, zero points and scale it had."""
    codes = (hi.codes.astype(np.uint16) * 16 + lo.codes).astype(np.uint8)
    zero_points = (hi.zero_points.astype(np.uint16) * 16 + lo.zero_points).astype(np.uint8)
    return gguf_blocks.BlockForm(lo.gguf_type, 8, lo.block, codes, lo.scales, zero_points, lo.offsets)


def forms_for(matrix: np.ndarray, weights: gguf_blocks.GGUFWeights) -> list[tuple[int, int, gguf_blocks.BlockForm]]:
    """Runs (start row, end row, form) covering matrix [rows, cols]: each row found in the GGUF by its exact values
    takes that tensor's blocks; consecutive rows of one type make one run (a packed QKV may mix types)."""
    kinds, sources = [], []
    for i in range(matrix.shape[0]):
        hit = weights.rows.get(gguf_blocks.row_key(matrix[i]))
        form = weights.forms[hit[0]] if hit else None
        if form is not None and matrix.shape[1] % form.block:
            hit = form = None
        sources.append(hit)
        kinds.append((form.gguf_type, form.bits, form.block) if form else None)
    runs = []
    start = 0
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[start]:
            if kinds[start] is None:
                runs.append((start, i, rtn8(matrix[start:i])))
            else:
                runs.append((start, i, _gather(sources[start:i], weights)))
            start = i
    return runs


def _gather(sources: list[tuple[str, int]], weights: gguf_blocks.GGUFWeights) -> gguf_blocks.BlockForm:
    """One form from the GGUF rows named, in order (consecutive rows of one tensor taken at once)."""
    pieces = [
        weights.forms[name].take(np.array([row for _, row in group]))
        for name, group in itertools.groupby(sources, key=lambda s: s[0])
    ]
    return _stack(pieces)


def _stack(forms: list[gguf_blocks.BlockForm]) -> gguf_blocks.BlockForm:
    """Forms of one shape of block stacked by rows, as one form."""
    first = forms[0]
    cat = lambda attr: np.concatenate([getattr(f, attr) for f in forms])  # noqa: E731
    return gguf_blocks.BlockForm(
        first.gguf_type,
        first.bits,
        first.block,
        cat("codes"),
        cat("scales"),
        cat("zero_points"),
        None if first.offsets is None else cat("offsets"),
        None if first.k is None else gguf_blocks.KScales.stack([f.k for f in forms]),
    )


class Graph:
    """Adds nodes and initializers to an ONNX model with unique names."""

    def __init__(self, model):
        import onnx

        self.onnx, self.model, self.graph = onnx, model, model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.new_nodes: list = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_gguf{self.count}"

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.graph.initializer.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(
        self, op: str, inputs: list[str], base: str, outputs: list[str] | None = None, domain: str = "", **attrs
    ) -> str:
        outputs = outputs or [self.name(base)]
        self.new_nodes.append(
            self.onnx.helper.make_node(op, inputs, outputs, name=self.name(base), domain=domain, **attrs)
        )
        return outputs[0]

    def array(self, name: str) -> np.ndarray | None:
        init = self.inits.get(name)
        return None if init is None else self.onnx.numpy_helper.to_array(init)


class GGUFNative(Quantizer):
    name = "gguf-native"
    description = "a GGUF source's own blocks (Q4_0/Q4_1/Q4_K/Q5_K/Q6_K/Q8_0...), exact, with a block-offset correction"
    precisions = ("int4",)
    algorithms = ("gguf",)
    cost = 5

    def check(self, request: ConvertRequest) -> str | None:
        if request.algorithm != "gguf":
            return "keeps a GGUF's own quantization only (--algorithm gguf)"
        if request.gguf is None:
            return "--algorithm gguf needs a GGUF source (the file's own blocks are kept)"
        return super().check(request)

    def graph_facts(self, request: ConvertRequest) -> GraphFacts:
        """MatMulGGML where the GGUF kernel takes the GGUF's types on this machine, else MatMulNBits."""
        library = kernel_for(request)
        if library and gguf_kernel.takes(request.gguf):
            return gguf_kernel.graph_facts(library)
        return super().graph_facts(request)

    def quantize(self, fp32_dir: Path, output_dir: Path, request: ConvertRequest) -> None:
        weights = gguf_blocks.read(request.gguf)
        # The integer kernel by default, as llama.cpp computes (int8 activations, one scale per block of 32), with
        # each MatMul's activation outliers kept in float: an outlier sets its block's int8 scale and flattens the
        # rest: a quarter of plain level 4's KLD, and faster than float compute (level 1, exact; docs/architecture.md,
        # "The measurements behind the constants").
        level = accuracy_level(request)
        channels = float_channels(fp32_dir, request, level)
        # The GGUF kernel where this machine can build it: each block's minimum applied inside the kernel, no float
        # correction (docs/architecture.md, "Speed"); MatMulNBits with corrections for what it does not hold.
        kernel = kernel_for(request)
        report = {
            "gguf": str(request.gguf),
            "float_channels": OUTLIER_CHANNELS if channels else 0,
            "kernel": str(kernel.name) if kernel else why_no_kernel(request),
        }
        forms_of = lambda _, matrix: forms_for(matrix, weights)  # noqa: E731
        write_blocks(fp32_dir, output_dir, forms_of, level, report, channels, kernel)


def float_channels(
    fp32_dir: Path, request: ConvertRequest, level: int, importance: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Each MatMul's activation outlier channels (by mean square over the calibration text, or importance where it
    was measured already) that integer compute keeps in float; none at float compute."""
    if level < INTEGER_ACTIVATIONS:
        return {}
    if importance is None:
        text = calibration_text(request.calibration) if request.calibration else None
        importance = calibration.activation_importance(fp32_dir, text)
    return calibration.outlier_channels(importance, OUTLIER_CHANNELS)


def accuracy_level(request: ConvertRequest) -> int:
    """The MatMulNBits accuracy level a request builds at: integer compute (4) unless it asks."""
    return INTEGER_ACTIVATIONS if request.accuracy_level is None else request.accuracy_level


def why_no_kernel(request: ConvertRequest) -> str:
    if not native_code_for(request.target):
        return f"target {request.target}: no native code"
    return gguf_kernel.why_not() or "not at this accuracy level"


def kernel_for(request: ConvertRequest) -> Path | None:
    """The GGUF kernel library a build of request carries: where it asks for integer compute, for this machine's
    native code (target "native" or this machine's platform), and the kernel builds and runs here; else None
    (MatMulNBits, portable)."""
    if accuracy_level(request) < INTEGER_ACTIVATIONS or not native_code_for(request.target):
        return None
    return gguf_kernel.library()


Forms = Callable[[str, np.ndarray], list[tuple[int, int, gguf_blocks.BlockForm]]]


def write_blocks(
    fp32_dir: Path,
    output_dir: Path,
    forms_of: Forms,
    level: int,
    report: dict,
    float_channels: dict[str, np.ndarray] | None = None,
    kernel: Path | None = None,
) -> None:
    """Write fp32_dir's model with every MatMul weight (and the embedding) in the block forms forms_of gives for
    it: forms_of(initializer name, matrix [rows = outputs, cols = inputs]) -> runs (start row, end row, form)
    covering the rows, or [] to keep that weight in float. level: the MatMulNBits accuracy level. float_channels:
    initializer name -> input channels (the activation outliers) that an integer-compute (level 4) MatMul takes out
    of its int8 activations and multiplies in float instead. kernel: the GGUF kernel library (gguf_kernel); the
    weights it holds exactly become MatMulGGML (the minimum and the float channels inside the kernel, no correction),
    attention its GroupQueryAttentionF16KV (the KV cache in fp16) where it computes the graph's, and the folder
    carries it.
    Forms of a GGUF type kept exactly count as "exact" in slmops-quantization.json, any other as "approximate"."""
    import onnx

    model = onnx.load(str(fp32_dir / "model.onnx"))
    g = Graph(model)
    skip = set(runtime_fed_matmuls(model))
    report = {**report, "exact": collections.Counter(), "approximate": collections.Counter(), "tensors": {}}
    float_channels = float_channels or {}
    sides: dict[tuple, str] = {}  # per input: its inliers and the side of its corrections
    done: dict[str, list[tuple[int, int, gguf_blocks.BlockForm, dict[str, str]]]] = {}
    planned = {}  # MatMul node name -> (weight name, K, runs, outlier channels or None)
    for node in model.graph.node:
        weight = g.array(node.input[1]) if node.op_type == "MatMul" and node.name not in skip else None
        if weight is None or weight.ndim != 2:
            continue
        runs = forms_of(node.input[1], np.ascontiguousarray(weight.T))
        channels = float_channels.get(node.input[1]) if level >= INTEGER_ACTIVATIONS else None
        channels = np.sort(channels) if channels is not None and len(channels) else None
        if runs:  # [] keeps this one in float
            planned[node.name] = (node.input[1], weight.shape[0], runs, channels)
    in_kernel = _kernel_forms(planned) if kernel else {}
    packs = _packs(model, {n: p for n, p in planned.items() if n not in in_kernel}, level)
    keep = []
    for node in model.graph.node:
        if node.name not in planned:
            keep.append(node)
            continue
        if node.name in in_kernel:
            name, k, parts = in_kernel[node.name]
            channels = planned[node.name][3]
            outputs, done[name] = [], []
            for start, form, kind in parts:
                weight = g.const(f"{name}_ggml", gguf_kernel.grouped(form, kind))
                outliers = []
                if channels is not None:  # multiplied in float inside the kernel
                    codes = gguf_kernel.outlier_codes(form, kind, channels)
                    outliers = [g.const(f"{name}_channels", channels.astype(np.int64)), g.const(f"{name}_codes", codes)]
                outputs.append(
                    g.node(
                        gguf_kernel.MATMUL,
                        [node.input[0], weight, *outliers],
                        f"{name}_MatMulGGML",
                        outputs=[node.output[0]] if len(parts) == 1 else None,
                        domain=gguf_kernel.DOMAIN,
                        doc_string=f"{name}:{start}",
                        ggml_type=kind,
                    )
                )
                done[name].append((start, start + form.codes.shape[0], form, {"ggml": weight, "kind": kind}))
            if len(parts) > 1:
                g.node("Concat", outputs, f"{node.name}_concat", outputs=[node.output[0]], axis=-1)
            for start, end, run in planned[node.name][2]:
                report[_kind(run)][run.gguf_type] += (end - start) * k
            report["tensors"][name] = [[start, end, run.gguf_type] for start, end, run in planned[node.name][2]]
            continue
        pack_of = packs.get(node.name)
        if pack_of is not None:  # siblings reading one input (gate and up): one MatMulNBits, then a Split
            if pack_of[0] is node:
                _write_pack(g, pack_of, planned, level, sides, report)
            continue
        name, k, runs, channels = planned[node.name]
        made, outputs = [], []
        for start, end, form in runs:
            y, names = _write_form(
                g, node.input[0], k, form, channels, level, f"{name}_{start}", f"{name}:{start}", sides
            )
            outputs.append(y)
            made.append((start, end, form, names))
            report[_kind(form)][form.gguf_type] += (end - start) * k
        if len(outputs) == 1:
            g.new_nodes[-1].output[0] = node.output[0]
        else:
            g.node("Concat", outputs, f"{node.name}_concat", outputs=[node.output[0]], axis=-1)
        report["tensors"][name] = [[s, e, f.gguf_type] for s, e, f, _ in made]
        done[name] = made
    model.graph.ClearField("node")
    model.graph.node.extend(keep)
    _quantize_embeddings(g, model, done, forms_of, report)
    model.graph.node.extend(g.new_nodes)
    _drop_unused(model)
    used = {i for n in model.graph.node for i in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(kept)
    _sort_topologically(model)
    if kernel:  # the kernel's attention too, its KV cache in fp16
        report["kv_cache"] = "fp16" if gguf_kernel.swap_attention(model) else "fp32"
    onnx.save(
        model,
        str(output_dir / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    copy_tree(fp32_dir, output_dir, skip=MODEL_FILES)
    if any(n.domain == gguf_kernel.DOMAIN for n in model.graph.node):
        gguf_kernel.carry(kernel, output_dir)
    report["exact"], report["approximate"] = dict(report["exact"]), dict(report["approximate"])
    write_json_atomic(output_dir / REPORT, report)


def _kernel_forms(planned: dict) -> dict[str, tuple]:
    """MatMul node name -> (weight name, K, [(start row, form, kernel type)]) for the weights the GGUF kernel holds
    exactly: runs of one type as one form (a packed QKV of three Q4_1 tensors is one), runs of several types one
    form each (a packed QKV of a 4-bit q and 5-bit k and v: one kernel call each, then a Concat)."""
    out = {}
    for node_name, (name, k, runs, _) in planned.items():
        kinds = [gguf_kernel.ggml_type(form) for _, _, form in runs]
        if None in kinds:
            continue
        if len(set(kinds)) == 1:
            form = _stack([form for _, _, form in runs])
            kind = gguf_kernel.ggml_type(form)  # stacked: still one fp16-exact form
            if kind is not None:
                out[node_name] = (name, k, [(0, form, kind)])
        else:
            out[node_name] = (
                name,
                k,
                [(start, form, kind) for (start, _, form), kind in zip(runs, kinds, strict=True)],
            )
    return out


def _write_form(
    g: Graph,
    x: str,
    k: int,
    form: gguf_blocks.BlockForm,
    channels: np.ndarray | None,
    level: int,
    tag: str,
    doc: str,
    sides: dict,
) -> tuple[str, list[dict[str, str]]]:
    """One block form as MatMulNBits on x (two 4-bit planes for 8 bits at float activations), plus its float
    correction: y += side @ [offsets; outlier rows]. Returns y and the names of its tensors (per plane)."""
    read = x if channels is None else _inliers(g, x, k, channels, sides)
    planes = nibble_planes(form) if level < INTEGER_ACTIVATIONS else [form]
    names = [
        {
            "b": g.const(f"{tag}_B", pack(p.codes, p.bits, p.block)),
            "scales": g.const(f"{tag}_scales", p.scales),
            "zp": g.const(f"{tag}_zp", pack_zero_points(p.zero_points, p.bits)),
        }
        for p in planes
    ]
    ys = [
        g.node(
            "MatMulNBits",
            [read, nm["b"], nm["scales"], nm["zp"]],
            f"{tag}_MatMulNBits",
            domain="com.microsoft",
            doc_string=doc + (f":{plane}" if len(planes) > 1 else ""),
            K=k,
            N=form.codes.shape[0],
            bits=p.bits,
            block_size=p.block,
            accuracy_level=level,
        )
        for nm, p, plane in zip(names, planes, ("hi", "lo"), strict=False)
    ]
    y = ys[0] if len(ys) == 1 else g.node("Add", ys, f"{tag}_planes", doc_string=PLANES)
    rows = []  # of the correction matrix: the block offsets, then the outlier channels' rows as written
    if form.offsets is not None:
        rows.append(form.offsets.T)  # [blocks, rows]
    if channels is not None:
        rows.append(form.dequantize()[:, channels].T)  # [channels, rows]
    if rows:
        block = form.block if form.offsets is not None else 0
        side = _side(g, x, k, block, channels, sides)
        correction = g.const(f"{tag}_correction", np.concatenate(rows))
        if channels is None:
            names[0]["offsets"] = correction  # exactly the offsets: the tied embedding reuses them
        y = g.node(
            "Add",
            [y, g.node("MatMul", [side, correction], f"{tag}_correction")],
            f"{tag}_corrected",
            doc_string=f"{CORRECTION}:{k // block if block else 0}",
        )
    return y, names


def _packs(model, planned: dict, level: int) -> dict[str, list]:
    """MatMul node name -> the sibling nodes it is packed with (the first one writes them all): MatMuls that read one
    input, each weight one form of the same shape of block and kept at integer compute, used by nothing else, with
    the same outlier channels. One kernel call and one correction instead of one each (SmolLM2's gate and up)."""
    if level < INTEGER_ACTIVATIONS:  # the planes of float activations stay per weight
        return {}
    uses = collections.Counter(i for n in model.graph.node for i in n.input)
    by_input = collections.defaultdict(list)
    for node in model.graph.node:
        plan = planned.get(node.name)
        if plan and len(plan[2]) == 1 and uses[plan[0]] == 1:
            by_input[node.input[0]].append(node)
    packs = {}
    for siblings in by_input.values():
        first = planned[siblings[0].name]
        shape = lambda plan: (plan[2][0][2].bits, plan[2][0][2].block, plan[2][0][2].offsets is None)  # noqa: E731
        same = [
            n
            for n in siblings
            if shape(planned[n.name]) == shape(first)
            and (planned[n.name][3] is None) == (first[3] is None)
            and (first[3] is None or np.array_equal(planned[n.name][3], first[3]))
        ]
        if len(same) > 1:
            packs.update({n.name: same for n in same})
    return packs


def _write_pack(g: Graph, siblings: list, planned: dict, level: int, sides: dict, report: dict) -> None:
    """Sibling MatMuls as one: their forms stacked by rows, one MatMulNBits and correction, a Split to their outputs.
    The MatMulNBits doc_string names each weight with its rows ("name:0:rows;..."), for read_back."""
    plans = [planned[n.name] for n in siblings]
    forms = [plan[2][0][2] for plan in plans]
    packed = _stack(forms)
    name, k, _, channels = plans[0]
    doc = PACKED.join(f"{plan[0]}:0:{form.codes.shape[0]}" for plan, form in zip(plans, forms, strict=True))
    y, _ = _write_form(g, siblings[0].input[0], k, packed, channels, level, f"{name}_packed", doc, sides)
    sizes = g.const("split", np.array([f.codes.shape[0] for f in forms], dtype=np.int64))
    g.node("Split", [y, sizes], f"{name}_split", outputs=[n.output[0] for n in siblings], axis=-1)
    for plan, form in zip(plans, forms, strict=True):
        report[_kind(form)][form.gguf_type] += form.codes.size
        report["tensors"][plan[0]] = [[0, form.codes.shape[0], form.gguf_type]]


def _inliers(g: Graph, x: str, k: int, channels: np.ndarray, cache: dict) -> str:
    """x with the outlier channels zeroed, what the integer kernel quantizes: an outlier channel would otherwise set
    the int8 scale of its whole block. Made once per input."""
    key = (x, channels.tobytes())
    if key not in cache:
        mask = np.ones(k, dtype=np.float32)
        mask[channels] = 0
        cache[key] = g.node("Mul", [x, g.const("inlier_mask", mask)], "inliers")
    return cache[key]


def _side(g: Graph, x: str, k: int, block: int, channels: np.ndarray | None, cache: dict) -> str:
    """[blocksum(inliers) per block of `block` (none if 0), x at the outlier channels]: what a correction matrix
    [offsets; outlier rows] multiplies. Made once per input, by reshaping and summing (a MatMul with a 0/1 matrix
    does the same, but reads that matrix each token: 19 MB for SmolLM2, and it was not faster)."""
    key = (x, block, b"" if channels is None else channels.tobytes())
    if key not in cache:
        parts = []
        if block:
            inliers = x if channels is None else _inliers(g, x, k, channels, cache)
            grouped = g.node(
                "Reshape", [inliers, g.const("blocks_shape", np.array([0, 0, k // block, block]))], "blocks"
            )
            parts.append(g.node("ReduceSum", [grouped, g.const("last_axis", np.array([-1]))], "blocksum", keepdims=0))
        if channels is not None:
            parts.append(
                g.node("Gather", [x, g.const("outlier_channels", channels.astype(np.int64))], "outliers", axis=-1)
            )
        cache[key] = parts[0] if len(parts) == 1 else g.node("Concat", parts, "side", axis=-1)
    return cache[key]


def _kind(form: gguf_blocks.BlockForm) -> str:
    return "exact" if form.gguf_type in gguf_blocks.FORMS else "approximate"


def _quantize_embeddings(g: Graph, model, done: dict, forms_of: Forms, report: dict) -> None:
    """The token embedding Gather reads the GGUF's blocks too (GatherBlockQuantized). A tied embedding (the fp32
    graph gathers from Transpose(lm_head weight)) shares the lm_head's quantized tensors, as the model builder does;
    where the lm_head's rows come in runs of several forms (gptq.head_by_use), each run gathers the ids that fall in
    it and a Where per run after the first picks its rows."""
    producers = {o: n for n in model.graph.node for o in n.output}
    keep = []
    for node in model.graph.node:
        source = node.input[0] if node.op_type == "Gather" else ""
        transpose = producers.get(source)
        if source in g.inits and g.array(source).ndim == 2:  # an embedding table of its own
            runs = forms_of(source, g.array(source))
            if len(runs) != 1:  # an own table is one form (a tied one may be several)
                runs = [(0, g.array(source).shape[0], rtn8(g.array(source)))]
            start, rows, form = runs[0]
            names = {
                "b": g.const("embed_B", pack(form.codes, form.bits, form.block)),
                "scales": g.const("embed_scales", form.scales),
                "zp": g.const("embed_zp", pack_zero_points(form.zero_points, form.bits)),
            }
            report[_kind(form)][form.gguf_type] += rows * form.codes.shape[1]
            report["tensors"][source] = [[0, rows, form.gguf_type]]
            held, name = [(start, rows, form, [names])], source
        elif transpose is not None and transpose.op_type == "Transpose" and transpose.input[0] in done:  # tied
            name = transpose.input[0]
            held = [(s, e, f, [nm] if "ggml" in nm else _plane_names(nm)) for s, e, f, nm in done[name]]
        else:
            keep.append(node)
            continue
        ids, y = node.input[1], None
        for start, end, form, names in held:
            local = ids
            if len(held) > 1:  # this run's rows: ids outside it read its first or last row, and are not picked
                first = g.const("embed_run_start", np.array(start, dtype=np.int64))
                last = g.const("embed_run_last", np.array(end - start - 1, dtype=np.int64))
                zero = g.const("embed_zero", np.array(0, dtype=np.int64))
                local = g.node("Sub", [ids, first], "embed_run_ids")
                local = g.node("Min", [g.node("Max", [local, zero], "embed_run_low"), last], "embed_run_high")
            rows = _gathered(g, local, form, names, f"{name}:embedding" + (f"+{start}" if start else ""))
            if y is None:
                y = rows
            else:
                inside = g.node("GreaterOrEqual", [ids, first], "embed_run_inside")
                inside = g.node(
                    "Unsqueeze", [inside, g.const("axis", np.array([-1], dtype=np.int64))], "embed_run_mask"
                )
                y = g.node("Where", [inside, rows, y], "embed_run_pick")
        g.new_nodes[-1].output[0] = node.output[0]  # y is the last node's output
    model.graph.ClearField("node")
    model.graph.node.extend(keep)


def _plane_names(names: dict[str, str]) -> list[dict[str, str]]:
    """A MatMulNBits run's tensor names as the embedding reads them: one dict per plane (one, or hi and lo)."""
    return names if isinstance(names, list) else [names]


def _gathered(g: Graph, ids: str, form: gguf_blocks.BlockForm, names: list[dict[str, str]], doc: str) -> str:
    """The rows ids name of one block form held by the kernel (GatherGGML) or as MatMulNBits tensors
    (GatherBlockQuantized per plane, plus the blocks' offsets where the form has them)."""
    if "ggml" in names[0]:
        held = names[0]
        return g.node(
            gguf_kernel.GATHER, [ids, held["ggml"]], "embed", domain=gguf_kernel.DOMAIN, doc_string=doc,
            ggml_type=held["kind"],
        )  # fmt: skip
    rows, width = form.codes.shape
    planes = nibble_planes(form) if len(names) > 1 else [form]
    gathered = []
    for nm, p, plane in zip(names, planes, ("hi", "lo"), strict=False):
        table_shape = g.const("table_shape", np.array([rows, -1], dtype=np.int64))
        flat = g.node("Reshape", [nm["b"], table_shape], "embed_table")
        gathered.append(
            g.node(
                "GatherBlockQuantized",
                [flat, ids, nm["scales"], nm["zp"]],
                "embed",
                domain="com.microsoft",
                doc_string=doc + (f":{plane}" if len(planes) > 1 else ""),
                gather_axis=0,
                quantize_axis=1,
                block_size=p.block,
                bits=p.bits,
            )
        )
    y = gathered[0] if len(gathered) == 1 else g.node("Add", gathered, "embed_planes", doc_string=PLANES)
    if form.offsets is None:
        return y
    offsets = names[0].get("offsets") or g.const("embed_offsets", form.offsets.T)  # [blocks, rows]
    per_row = g.node("Transpose", [offsets], "embed_offsets_rows", perm=[1, 0])
    offs = g.node(
        "Unsqueeze",
        [g.node("Gather", [per_row, ids], "embed_offsets"), g.const("axis", np.array([-1], dtype=np.int64))],
        "embed_offsets_1",
    )
    blocks = g.node(
        "Reshape", [y, g.const("shape", np.array([0, 0, width // form.block, form.block], dtype=np.int64))],
        "embed_blocks",
    )  # fmt: skip
    added = g.node("Add", [blocks, offs], "embed_add")
    return g.node("Reshape", [added, g.const("shape", np.array([0, 0, width], dtype=np.int64))], "embed_rows")


def _drop_unused(model) -> None:
    """Remove nodes whose outputs nothing reads (the fp32 embedding's Transpose once the Gather is quantized)."""
    wanted = {o.name for o in model.graph.output}
    while True:
        used = wanted | {i for n in model.graph.node for i in n.input}
        alive = [n for n in model.graph.node if any(o in used for o in n.output)]
        if len(alive) == len(model.graph.node):
            return
        model.graph.ClearField("node")
        model.graph.node.extend(alive)


def _sort_topologically(model) -> None:
    """Nodes in an order where every input is made before it is used (ONNX requires it)."""
    ready = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise RuntimeError(f"the rewritten graph has a cycle or a missing input at {rest[0].name}")
        pending = rest
    model.graph.ClearField("node")
    model.graph.node.extend(ordered)


def read_back(model_dir: Path) -> dict[str, np.ndarray]:
    """Every weight this quantizer wrote, dequantized from what model.onnx holds, by the fp32 graph's initializer
    name: MatMul weights as [K, N]; an embedding table as "NAME:embedding" [vocab, hidden] (for a tied one NAME is
    the lm_head weight it shares). Offsets are read from the correction that follows each node."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_dir / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    readers = collections.defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            readers[i].append(n)

    def initializer(name: str) -> np.ndarray:  # through the Reshape/Transpose/Gather/Unsqueeze in front of it
        while name not in inits:
            node = producer[name]
            name = node.input[1] if node.op_type == "MatMul" else node.input[0]
        return inits[name]

    def offsets_after(output: str) -> np.ndarray | None:
        for reader in readers[output]:
            if reader.op_type == "Reshape" or reader.doc_string == PLANES:  # the embedding adds per block
                return offsets_after(reader.output[0])
            if reader.doc_string.startswith(CORRECTION):
                blocks = int(reader.doc_string.split(":")[1])
                return np.ascontiguousarray(initializer(reader.input[1])[:blocks].T) if blocks else None
            if reader.op_type == "Add":  # the embedding's offsets, per block
                return np.ascontiguousarray(initializer(reader.input[1]).T)
        return None

    forms: dict[tuple[str, str], dict[str, gguf_blocks.BlockForm]] = collections.defaultdict(dict)
    parts: dict[str, list[tuple[int, np.ndarray]]] = collections.defaultdict(list)
    for node in model.graph.node:
        if node.domain == gguf_kernel.DOMAIN and ":" in node.doc_string:
            kind = onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "ggml_type"))
            name, where = node.doc_string.split(":")
            forms[name, where][""] = gguf_kernel.form_of(initializer(node.input[1]), kind)
            continue
        if node.op_type not in ("MatMulNBits", "GatherBlockQuantized") or ":" not in node.doc_string:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        bits, block = attrs.get("bits", 4), attrs["block_size"]
        b = initializer(node.input[1 if node.op_type == "MatMulNBits" else 0])
        scales, zp = initializer(node.input[2]), initializer(node.input[3])
        cols = scales.shape[1] * block
        codes, z = unpack(b, zp, bits, cols, scales.shape[1])
        form = gguf_blocks.BlockForm("", bits, block, codes, scales, z, offsets_after(node.output[0]))
        if PACKED in node.doc_string:  # siblings stacked by rows: each weight its own rows back
            values, row = form.dequantize(), 0
            for entry in node.doc_string.split(PACKED):
                name, where, rows = entry.split(":")
                parts[name].append((int(where), values[row : row + int(rows)].T))
                row += int(rows)
            continue
        name, where, *plane = node.doc_string.split(":")
        forms[name, where][plane[0] if plane else ""] = form
    for (name, where), planes in forms.items():
        form = join_planes(planes["hi"], planes["lo"]) if "hi" in planes else planes[""]
        if where.startswith("embedding"):  # "embedding", or "embedding+START" for a run of rows after the first
            parts[f"{name}:embedding"].append((int(where.partition("+")[2] or 0), form.dequantize()))
        else:
            parts[name].append((int(where), form.dequantize().T))
    axis = {True: 0, False: 1}
    return {
        name: np.concatenate([v for _, v in sorted(p, key=lambda x: x[0])], axis=axis[name.endswith(":embedding")])
        for name, p in parts.items()
    }


@hookimpl
def register_quantizers(register):
    register(GGUFNative())
