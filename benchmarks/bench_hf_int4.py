"""int4 routes for a Hugging Face (float) source, side by side in one run: size, faithfulness to the source (torch)
and speed of slmops's gptq (the default int4 for float sources: error-compensating rounding, 4/5/8 bits within
llama.cpp Q4_K_M's bytes, in slmops's GGUF kernel), imatrix (scale and float min per block of 32, searched),
the model builder's RTN int4 (asymmetric with lm_head at 8 bits, and its symmetric default), ONNX Runtime's HQQ
(float zero points), and int8.

No float SmolLM2 can be downloaded here, so the source is made from the embedded one: its GGUF weights (4-bit
blocks; the embedding 8-bit) with each block's rounding undone by uniform noise of one quantization step
(value + U(-step/2, step/2), seed 0). That is what a float model looks like to a quantizer (weights off any grid,
the same per-block ranges) while staying a working model. Faithfulness: KL(source || build) per position, torch
against ORT GenAI, on slmops's corpus (512-token windows, the second half of each scored)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_quality import ort_speed, prompt_tokens  # noqa: E402 (the same speed measurement as the GGUF bench)

BUILDS = [
    ("fp32", {"precision": "fp32"}),
    ("int4 gptq (default for float sources)", {"precision": "int4", "algorithm": "gptq"}),
    ("int4 gptq, float activations", {"precision": "int4", "algorithm": "gptq", "accuracy_level": 1}),
    ("int4 imatrix", {"precision": "int4", "algorithm": "imatrix", "symmetric": False}),
    (
        "int4 imatrix, float activations",
        {"precision": "int4", "algorithm": "imatrix", "symmetric": False, "accuracy_level": 1},
    ),
    ("int4 rtn_last asym (builder)", {"precision": "int4", "algorithm": "rtn_last", "symmetric": False}),
    ("int4 rtn sym (builder default)", {"precision": "int4", "algorithm": "rtn", "symmetric": True}),
    ("int4 hqq (float zero points)", {"precision": "int4", "algorithm": "hqq", "symmetric": False}),
    ("int8 q8_0 (default for float sources)", {"precision": "int8"}),
    ("int8 builder (MatMulNBits, float embedding)", {"precision": "int8", "algorithm": "rtn"}),
]
SEED = 0


def dithered(checkpoint: Path, out: Path) -> Path:
    """The float stand-in source described above, written once to out."""
    from safetensors.numpy import load_file, save_file

    if (out / "model.safetensors").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(SEED)
    tensors = load_file(str(checkpoint / "model.safetensors"))
    for name, value in tensors.items():
        if value.ndim != 2 or value.shape[1] % 32:
            continue
        x = value.astype(np.float64).reshape(value.shape[0], -1, 32)
        lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
        step4 = (hi - lo) / 15
        codes = (x - lo) / np.where(step4 > 0, step4, 1)
        on_4bit_grid = np.abs(codes - np.rint(codes)).max(-1, keepdims=True) < 1e-3  # Q4_1; else Q8_0
        step = np.where(on_4bit_grid, step4, np.abs(x).max(-1, keepdims=True) / 127)
        tensors[name] = (x + (rng.random(x.shape) - 0.5) * step).reshape(value.shape).astype(np.float32)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for f in checkpoint.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    return out


def torch_logits(checkpoint: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()

    def logits(tokens: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([tokens])).logits[0].float().numpy()

    return logits


def main() -> None:
    from slmops import convert, quality, sources
    from slmops.config import home
    from slmops.fsutil import dir_size
    from slmops.runtime import Session

    os.environ.pop(quality.SET_ENV, None)  # the whole shipped corpus
    source = dithered(sources.resolve(None).checkpoint, home() / "bench" / f"smollm2-dithered-{SEED}")
    builds = {}
    for label, options in BUILDS:
        start = time.perf_counter()
        builds[label] = convert.convert(str(source), options).path
        print(f"  {label}: {time.perf_counter() - start:.0f} s", flush=True)
    fp32 = Session(builds["fp32"])
    candidates = {label: Session(path).logits for label, path in builds.items()}
    print(f"scoring {len(candidates)} builds against the source (torch) on the corpus ...", flush=True)
    start = time.perf_counter()
    scores = quality.score(torch_logits(source), candidates, fp32.tokens, prefix=fp32.prefix)
    print(f"  {time.perf_counter() - start:.0f} s, {next(iter(scores.values())).positions} positions", flush=True)
    tokens = prompt_tokens(fp32.encode)
    rows = []
    for label, path in builds.items():
        q = scores[label]
        pp, tg = ort_speed(path, tokens)
        rows.append({"build": label, "mb": dir_size(path) / 1e6, "pp128": pp, "tg128": tg, **q.to_json()})
    print(
        f"\n{'build (source: torch)':<42} {'MB':>6} {'x fp32':>6} {'mean KLD':>9} {'KLD p99':>8} {'top-1':>6} "
        f"{'PPL':>6} {'pp128':>7} {'tg128':>7}"
    )
    for r in rows:
        print(
            f"{r['build']:<42} {r['mb']:>6.0f} {r['mb'] / rows[0]['mb']:>6.2f} {r['mean_kld']:>9.4f} "
            f"{r['kld_p99']:>8.3f} {r['top1_agreement']:>6.3f} {r['perplexity']:>6.2f} {r['pp128']:>7.0f} "
            f"{r['tg128']:>7.1f}"
        )
    print(f"\nsource perplexity {rows[0]['reference_perplexity']:.2f}")
    if "--json" in sys.argv:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
