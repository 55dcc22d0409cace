"""Calibration for quantizers: what flows into each MatMul of an fp32 build, measured by running it (ONNX Runtime)
over text that slmops does not score on (slmops/data/calibration.txt: the documentation of some Python standard
library modules, shipped, so nothing is downloaded). imatrix weights its block fit by it; gguf-native picks the
activation outliers it keeps in float."""

from __future__ import annotations

import json
from collections.abc import Collection
from importlib import resources
from pathlib import Path

import numpy as np

# In windows of WINDOW tokens. GPTQ's H and the output layer's token use take up to 6x the rest (docs/user-guide.md,
# the float-source section, has what it changed); the mean squares (outlier channels, imatrix), Fisher and learned
# scales keep 4,096: every GGUF build pays for the first, and the torch passes cost a backward pass per window.
CALIBRATION_TOKENS = 4096
HESSIAN_TOKENS = 24576
TOKENS_PER_COLUMN = 16  # H of a MatMul K inputs wide: from 16 K tokens (SmolLM2-135M's widest, 1536: all 24,576)
WINDOW = 512
CALIBRATION = "data/calibration.txt"  # made by data/make_calibration.py


def calibration_text() -> str:
    """Prose and code that slmops does not score on: the same text on every machine and every Python, so a build is
    the same wherever it is made (rendered at build time, pydoc's text differed between Python releases and, through
    live objects such as memory addresses, between runs; it moved SmolLM2's outlier channels and the deployed
    answer)."""
    return resources.files("slmops").joinpath(CALIBRATION).read_text(encoding="utf-8")


def calibration_tokens(model_dir: Path, text: str | None = None, limit: int = CALIBRATION_TOKENS) -> list[int]:
    """The calibration text (the shipped one, or text) in the model's tokens (its own tokenizer files; at most
    limit)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return tokenizer(text or calibration_text(), verbose=False).input_ids[:limit]


def activation_importance(fp32_dir: Path, text: str | None = None) -> dict[str, np.ndarray]:
    """Weight initializer name -> mean square of each input channel of its MatMul over the calibration text."""
    return activation_statistics(fp32_dir, text, full=False)


def matmul_inputs(fp32_dir: Path) -> dict[str, str]:
    """Weight initializer name -> the name of what flows into its MatMul, in graph order (q, k and v share one)."""
    import onnx

    return _weight_inputs(onnx.load(str(fp32_dir / "model.onnx"), load_external_data=False))


def _weight_inputs(model) -> dict[str, str]:
    inits = {i.name for i in model.graph.initializer}
    return {n.input[1]: n.input[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}


def activation_statistics(
    fp32_dir: Path, text: str | None = None, full: bool = False, weights: Collection[str] | None = None
) -> dict[str, np.ndarray]:
    """Weight initializer name -> the mean of x x^T over the calibration text (the shipped one, or text), x what
    flows into its MatMul: [K, K] float32 (full; GPTQ's Hessian, one array shared by the weights of one input) or
    its diagonal [K] (the mean square of each input channel). weights: only these (full H of a wide model's every
    MatMul does not fit in memory at once: gptq measures them in groups). From the fp32 graph run by ONNX Runtime
    with the MatMul inputs as extra outputs (an empty KV cache). The weights are read once, by ONNX Runtime from the
    build's own data file (the graph alone is rewritten in memory)."""
    return _statistics(fp32_dir, text, full, weights, use=False)[0]


def statistics_and_use(
    fp32_dir: Path, text: str | None = None, weights: Collection[str] | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """activation_statistics(full=True) of weights and token_use, from one pass over the calibration text."""
    return _statistics(fp32_dir, text, True, weights, use=True)


def token_use(fp32_dir: Path, text: str | None = None) -> np.ndarray:
    """How much each vocabulary entry is used: the source's next-token probability of it, averaged over the positions
    of the calibration text (the shipped one, or text), [vocab], summing to 1."""
    return _statistics(fp32_dir, text, False, (), use=True)[1]


def hessian_tokens(model) -> int:
    """How many calibration tokens GPTQ's H and the vocabulary's use are measured on for model (the fp32 graph):
    TOKENS_PER_COLUMN per input of its widest MatMul, within CALIBRATION_TOKENS..HESSIAN_TOKENS. Every real model
    (SmolLM2-135M and up) takes HESSIAN_TOKENS; a narrow one's H is full rank from fewer, and the pass over the
    vocabulary costs as much per token at any width."""
    inits = {i.name: i for i in model.graph.initializer}
    widest = max((inits[w].dims[0] for w in _weight_inputs(model)), default=0)
    return min(HESSIAN_TOKENS, max(CALIBRATION_TOKENS, TOKENS_PER_COLUMN * widest))


def outlier_channels(importance: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """Weight name -> the count input channels of largest mean square (at most a quarter of them), unsorted."""
    return {name: np.argsort(-ms, kind="stable")[: min(count, len(ms) // 4)] for name, ms in importance.items()}


def _statistics(
    fp32_dir: Path, text: str | None, full: bool, weights: Collection[str] | None, use: bool
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    import onnx

    model = onnx.load(str(fp32_dir / "model.onnx"), load_external_data=False)
    weight_of = _weight_inputs(model)
    if weights is not None:
        chosen = set(weights)
        weight_of = {w: x for w, x in weight_of.items() if w in chosen}
    listened = sorted(set(weight_of.values()) - {o.name for o in model.graph.output})
    model.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in listened
    )
    sums: dict[str, np.ndarray] = {}
    used = None
    limit = hessian_tokens(model) if full or use else CALIBRATION_TOKENS
    for outs in _windows(fp32_dir, model, listened + (["logits"] if use else []), text, limit):
        for name, value in zip(listened, outs, strict=False):
            x = value.reshape(-1, value.shape[-1])
            # float32 products of a window, summed over a few windows (GPTQ damps H's diagonal by a tenth of its mean anyway)
            part = x.T @ x if full else (x.astype(np.float64) ** 2).sum(0)
            if name in sums:
                sums[name] += part
            else:
                sums[name] = part
        if use:  # each position's next-token probabilities (each sums to 1), summed over positions
            z = outs[-1][0]  # [positions, vocab], ours to overwrite: in place, as a vocabulary-wide pass is costly
            z -= z.max(-1, keepdims=True)
            np.exp(z, out=z)
            # every row divided by its sum and the rows added, as one product; windows added in float64
            inverse_sums = (1.0 / z.sum(-1, dtype=np.float64)).astype(np.float32)
            p = (inverse_sums @ z).astype(np.float64)
            used = p if used is None else used + p
    count = len(calibration_tokens(fp32_dir, text, limit))
    for total in sums.values():
        total /= count
    return {w: sums[x] for w, x in weight_of.items() if x in sums}, None if used is None else used / used.sum()


def _windows(fp32_dir: Path, model, outputs: list[str], text: str | None, limit: int):
    """The outputs of the fp32 graph (model, its weights in fp32_dir's data file) for each window of the calibration
    text's tokens, run by ONNX Runtime from an empty KV cache."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the listened names
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(fp32_dir))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    config = json.loads((fp32_dir / "genai_config.json").read_text())["model"]
    decoder = config["decoder"]
    # a model with a shorter context than a window (its RoPE caches end there) reads windows of its context
    window_tokens = min(WINDOW, int(config.get("context_length") or WINDOW))
    # Sliding-window layers (Gemma 2/3) refuse a KV cache shorter than their window, however short the text: theirs
    # is an empty cache of the window's capacity (what ORT GenAI feeds; the same logits to the bit, past the window
    # too), the others' an empty one.
    window = int((decoder.get("sliding_window") or {}).get("window_size") or 0)

    def empty(capacity: int) -> np.ndarray:
        return np.zeros((1, decoder["num_key_value_heads"], capacity, decoder["head_size"]), dtype=np.float32)

    names = {i.name for i in session.get_inputs()}
    feeds = {
        i.name: empty(window if "sliding" in str(i.shape[2]) else 0)
        for i in session.get_inputs()
        if i.name.startswith("past_key_values")
    }
    tokens = calibration_tokens(fp32_dir, text, limit)
    for start in range(0, len(tokens), window_tokens):
        ids = np.array([tokens[start : start + window_tokens]], dtype=np.int64)
        run = {**feeds, "input_ids": ids, "attention_mask": np.ones_like(ids)}
        yield session.run(outputs, {k: v for k, v in run.items() if k in names})
