"""Check a built model: read back what the graph applied, and make ORT GenAI generate from it."""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slmops.errors import SlmopsError
from slmops.plugin.roles import ConvertRequest

# lm_head is kept at 8 bits by these algorithms; k_quant_mixed promotes some layers to 8 bits.
EIGHT_BIT_ALLOWED = {"rtn_last", "k_quant_last", "k_quant_mixed", "gguf", "imatrix", "gptq"}
# 8-bit blocks at float activations are written as two 4-bit planes (gguf_native.nibble_planes).
EIGHT_BITS_IN_PLANES = {"q8_0"}
# The GGUF's own blocks decide block sizes and zero points (Q6_K: blocks of 16; Q4_1: a minimum per block).
LAYOUT_FROM_SOURCE = {"gguf"}


def graph_quantization(model_dir: Path) -> dict[str, Any]:
    """What the graph holds: MatMulNBits nodes by bits/block size/symmetry, float MatMuls, weight dtype."""
    import onnx

    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    nbits = collections.Counter()
    block_sizes, accuracy, symmetric = set(), set(), set()
    float_matmuls = 0
    ops = collections.Counter(node.op_type for node in model.graph.node)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            nbits[int(attrs.get("bits", 4))] += 1
            block_sizes.add(int(attrs["block_size"]))
            accuracy.add(int(attrs.get("accuracy_level", 0)))
            # A fourth input (zero points) means asymmetric quantization.
            symmetric.add(not (len(node.input) > 3 and node.input[3]))
        elif node.op_type == "MatMul":
            float_matmuls += 1
    dtypes = collections.Counter(onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer)
    return {
        "matmul_nbits": {str(k): v for k, v in sorted(nbits.items())},
        "block_sizes": sorted(block_sizes),
        "symmetric": sorted(symmetric),
        "accuracy_levels": sorted(accuracy),
        "float_matmuls": float_matmuls,
        "weight_dtypes": dict(dtypes.most_common(3)),
        "ops": dict(sorted(ops.items())),
    }


def compare(request: ConvertRequest, graph: dict[str, Any], facts: dict[str, Any] | None = None) -> list[str]:
    """Differences between what was asked (and what the quantizer declared, its graph_facts) and what the graph
    says; empty when they agree."""
    problems = []
    declared = list((facts or {}).get("ops") or ["MatMulNBits"])
    missing = [op for op in declared if not graph.get("ops", {}).get(op)]
    if request.precision not in ("fp32", "fp16") and missing:
        problems.append(f"the quantizer declared {', '.join(missing)} nodes, but the graph has none")
    if "MatMulNBits" not in declared:  # another representation: its declared facts and measured quality judge it
        return problems
    bits = {int(b) for b in graph["matmul_nbits"]}
    if request.precision in ("fp32", "fp16"):
        if bits:
            problems.append(
                f"asked {request.precision} but the graph has quantized MatMulNBits nodes ({graph['matmul_nbits']})"
            )
        if request.precision == "fp16" and "FLOAT16" not in graph["weight_dtypes"]:
            problems.append("asked fp16 but no float16 weights found")
        return problems
    want = 8 if request.precision == "int8" else 4
    allowed = {want} | ({8} if want == 4 and request.algorithm in EIGHT_BIT_ALLOWED else set())
    planes = want == 8 and request.algorithm in EIGHT_BITS_IN_PLANES
    if planes:
        allowed = {4, 8}  # 8 bits, or two planes of 4
    if not bits:
        if not missing:
            problems.append(f"asked {request.precision} but the graph has no MatMulNBits nodes")
    elif not bits <= allowed or (want not in bits and not planes):
        problems.append(f"asked {request.precision} but MatMulNBits bits are {sorted(bits)}")
    if request.algorithm in LAYOUT_FROM_SOURCE:
        return problems
    if graph["block_sizes"] and graph["block_sizes"] != [request.block_size]:
        problems.append(f"asked block size {request.block_size} but the graph has {graph['block_sizes']}")
    if graph["symmetric"] and graph["symmetric"] != [request.symmetric]:
        asked = "symmetric" if request.symmetric else "asymmetric"
        problems.append(
            f"asked {asked} but the graph's quantization is {'symmetric' if graph['symmetric'] == [True] else 'mixed or asymmetric'}"
        )
    if request.accuracy_level and graph["accuracy_levels"] != [request.accuracy_level]:
        problems.append(f"asked accuracy level {request.accuracy_level} but the graph has {graph['accuracy_levels']}")
    return problems


def generate_check(model_dir: Path, prompt: str = "The capital of France is", new_tokens: int = 8) -> dict[str, Any]:
    """Load with ORT GenAI and generate a few greedy tokens (the base model, without adapters); raises if the
    model cannot generate."""
    from slmops.run.runtime import Session

    session = Session(model_dir, "none")
    out = list(session.greedy(session.encode(prompt), new_tokens))
    if not out:
        raise RuntimeError("the model generated no token")
    return {"prompt": prompt, "tokens": len(out), "text": session.decode(out)}


def adapter_effect(model_dir: Path, name: str, prompt: str = "The capital of France is") -> dict[str, Any]:
    """Load the adapter with ORT GenAI and measure how far it moves the next-token logits; raises if it cannot
    be applied. A LoRA that changes nothing was not applied."""
    import numpy as np

    from slmops.run.runtime import Session

    session = Session(model_dir, "none")
    tokens = session.encode(prompt)
    base = session.logits(tokens)[-1]
    session.use_adapter(name)
    tuned = session.logits(tokens)[-1]
    return {
        "name": name,
        "max_logit_change": round(float(np.abs(tuned - base).max()), 6),
        "top1_changed": bool(base.argmax() != tuned.argmax()),
    }


# -- against the source --------------------------------------------------------------------------------------------
SOURCE_POSITIONS = 192  # tokens of the shipped corpus, teacher-forced through both models
FP32_MAX_KLD = 1e-4  # an fp32 build is the source in another runtime: only float rounding may differ
DIVERGED_KLD = 1e-3  # a position counts as diverging from here (or where the top token differs)


def source_logits(source_dir: str, text: str, limit: int, trust_remote_code: bool) -> tuple[list[int], Any, list[int]]:
    """The source's own tokens for text (its tokenizer, BOS and all; at most limit), its next-token logits in
    torch, float32, [len(tokens), vocab], and its end-of-text ids (run in a child process)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source_dir, trust_remote_code=trust_remote_code)
    tokens = tokenizer(text).input_ids[:limit]
    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    # What ends a text for the source: config.json's eos ids and the tokenizer's eos (what the builder reads too)
    eos = {tokenizer.eos_token_id, *ids(model.config.eos_token_id)} - {None}
    with torch.no_grad():
        return tokens, model(torch.tensor([tokens])).logits[0].float().numpy(), sorted(eos)


def ids(value: Any) -> list[int]:
    """A token id setting (one id, a list of them, or none) as a list."""
    return [] if value is None else [int(v) for v in (value if isinstance(value, list) else [value])]


def against_source(model_dir: Path, request: ConvertRequest) -> dict[str, Any]:
    """Teacher-force the source's tokens through the build (ORT GenAI, no adapter) and the source (torch): KL(source
    || build) per position, top-1 agreement, the first position that diverges; and whether the deployed runtime
    tokenizes the text as the source's tokenizer does (BOS included)."""
    import numpy as np

    from slmops.host.isolate import in_child
    from slmops.measure.quality import kl, load_set, log_softmax
    from slmops.run.runtime import Session

    session = Session(model_dir, "none")
    text = "\n\n".join(row["text"] for row in load_set(None, shipped=True) if "text" in row)
    limit = min(SOURCE_POSITIONS, session.context_length - 1)
    tokens, logits, eos = in_child(
        source_logits, str(request.source_dir), text, limit, request.trust_remote_code, warm=True
    )
    reference, built = log_softmax(logits), log_softmax(session.logits(tokens))
    if reference.shape != built.shape:
        return {"error": f"the build gives logits of shape {built.shape}, the source {reference.shape}"}
    # A NaN or infinite logit anywhere (a NaN weight, an overflow) fails the build, whatever the means say
    broken = {
        "source": int((~np.isfinite(logits).all(axis=-1)).sum()),
        "build": int((~np.isfinite(built).all(axis=-1)).sum()),
    }
    kld = kl(reference, built)
    same_top = reference.argmax(-1) == built.argmax(-1)
    diverged = np.flatnonzero((kld > DIVERGED_KLD) | ~same_top)
    ours = session.encode(text)[:limit]
    return {
        "positions": len(tokens),
        "mean_kld": float(kld.mean()),
        "max_kld": float(kld.max()),
        "top1_agreement": float(same_top.mean()),
        "first_divergence": int(diverged[0]) if len(diverged) else None,
        "first_token_difference": first_difference(ours, tokens),
        "eos": {"source": eos, "build": sorted(session.eos_ids)},
        "nonfinite_positions": broken,
    }


def first_difference(a: Sequence[Any], b: Sequence[Any]) -> int | None:
    """The first index where two token lists (or texts) differ, one ending early counting; None when equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def source_problems(request: ConvertRequest, found: dict[str, Any]) -> list[str]:
    """What the source check found wrong. Every build: the runtime's tokens and end-of-text ids must be the source's
    (a misread BOS or eos). An fp32 build must also be its source: a misread RoPE, norm or window fails here."""
    if "error" in found:
        return [found["error"]]
    problems = []
    broken = found.get("nonfinite_positions", {})
    if broken.get("source"):
        problems.append(
            f"the source itself gives NaN or infinite logits at {broken['source']} of {found['positions']} positions "
            "in torch: its weights hold NaN or infinite values; fix or re-export the checkpoint"
        )
    elif broken.get("build") or not math.isfinite(found["mean_kld"]):
        problems.append(
            f"the build gives NaN or infinite logits at {broken.get('build', '?')} of {found['positions']} positions "
            "where the source gives none; it is broken"
        )
    if found.get("first_token_difference") is not None:  # every build of the source would feed the wrong tokens
        problems.append(
            f"the runtime tokenizes text unlike the source's tokenizer from token {found['first_token_difference']} "
            "on (a BOS missing or doubled, or a tokenizer file the runtime reads differently)"
        )
    missing = sorted(set(found["eos"]["source"]) - set(found["eos"]["build"]))
    if missing:  # generation would run past the end of an answer
        problems.append(
            f"the build does not stop at end-of-text ids {missing} that the source's config.json or tokenizer names "
            f"(it stops at {found['eos']['build']})"
        )
    if request.precision == "fp32" and (found["mean_kld"] > FP32_MAX_KLD or found["top1_agreement"] < 1.0):
        problems.append(
            f"the fp32 build does not match its source in torch: mean KLD {found['mean_kld']:.2e} (at most "
            f"{FP32_MAX_KLD:g}), top-1 agreement {found['top1_agreement']:.3f} over {found['positions']} positions, "
            f"first diverging at position {found['first_divergence']}; the converter misread the model's config"
        )
    return problems


def verify_build(
    model_dir: Path, request: ConvertRequest, facts: dict[str, Any] | None, adapter: str | None
) -> dict[str, Any]:
    """The verify stage of a build: its graph read back against the request and the quantizer's facts, a few tokens
    generated, its logits against the source in torch (or, with an adapter kept apart, the adapter's effect). What it
    found, for the manifest; raises with every problem where there is one, before anything is stored."""
    graph = graph_quantization(model_dir)
    problems = compare(request, graph, facts)
    try:
        sample = generate_check(model_dir)
    except Exception as e:
        sample, problems = None, problems + [f"ORT GenAI cannot generate: {type(e).__name__}: {e}"]
    found = None
    if not problems and not adapter:  # with an adapter kept apart, the source is base plus adapter
        found = against_source(model_dir, request)
        problems += source_problems(request, found)
    effect = None
    if adapter and not problems:
        try:
            effect = adapter_effect(model_dir, adapter)
            if effect["max_logit_change"] == 0:
                problems.append(f"the adapter {adapter!r} loads but changes nothing: the LoRA was not applied")
        except Exception as e:
            problems.append(f"ORT GenAI cannot apply the adapter {adapter!r}: {type(e).__name__}: {e}")
    if problems:
        raise SlmopsError("verification failed, nothing was written: " + "; ".join(problems))
    return {"ok": True, "graph": graph, "sample": sample, "source": found, "adapter": effect}
