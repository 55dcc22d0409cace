"""int4 routes for a Hugging Face (float) source, side by side in one run: size, faithfulness to the source (torch)
and speed of slmops's gptq (the default int4 for float sources: error-compensating rounding, Q4_0 to Q8_0 blocks within
llama.cpp Q4_K_M's bytes, in slmops's GGUF kernel), imatrix (scale and float min per block of 32, searched),
the model builder's RTN int4 (asymmetric with lm_head at 8 bits, and its symmetric default), ONNX Runtime's HQQ
(float zero points), and int8.

Two float sources (benchmarks/float_sources.py, made from the embedded SmolLM2 since none can be downloaded): the
dithered stand-in (its 4-bit weights moved off the grid) and a real fine-tune (on the order-record task of
benchmarks/make_domain.py). Faithfulness: KL(source || build) per position, torch against ORT GenAI, on slmops's
corpus (512-token windows, the second half of each scored). On the fine-tune, also its held-out domain rows:
accuracy (every field of the record right, under the schema) and fields, beside its fp32 build's; and gptq
calibrated on the fine-tune's own training rows (--calibration)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_quality import ort_speed, prompt_tokens  # noqa: E402 (the same speed measurement as the GGUF bench)
from float_sources import SEED, dithered, finetuned, make_domain  # noqa: E402

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


def torch_logits(checkpoint: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()

    def logits(tokens: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([tokens])).logits[0].float().numpy()

    return logits


# On the fine-tune: the default int4 and int8, the strongest alternatives, and gptq calibrated on its own data.
FINETUNE_BUILDS = [
    b
    for b in BUILDS
    if b[0]
    in {
        "fp32",
        "int4 gptq (default for float sources)",
        "int4 imatrix",
        "int4 rtn_last asym (builder)",
        "int8 q8_0 (default for float sources)",
    }
]
OWN_CALIBRATION = "int4 gptq, calibrated on the fine-tune's training rows"


def measure(source: Path, builds_asked: list[tuple[str, dict]], domain: Path | None) -> list[dict]:
    """Each build of source: MB, quality against torch on the shipped corpus, speed, and (with domain) the held-out
    rows' shares."""
    from slmops import convert, quality
    from slmops.chat import OrtGenAIChat
    from slmops.domain import score
    from slmops.fsutil import dir_size
    from slmops.runtime import Session

    builds = {}
    for label, options in builds_asked:
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
    held_out = quality.load_set(domain) if domain else []
    for label, path in builds.items():
        pp, tg = ort_speed(path, tokens)
        row = {"build": label, "mb": dir_size(path) / 1e6, "pp128": pp, "tg128": tg, **scores[label].to_json()}
        if held_out:
            shares = score(OrtGenAIChat(path), held_out)
            row.update(domain_accuracy=shares["accuracy"], domain_fields=shares["fields"])
        rows.append(row)
    return rows


def table(title: str, rows: list[dict]) -> None:
    domain = "domain_accuracy" in rows[0]
    print(
        f"\n{title:<52} {'MB':>6} {'x fp32':>6} {'mean KLD':>9} {'KLD p99':>8} {'top-1':>6} {'PPL':>6} "
        f"{'pp128':>7} {'tg128':>7}" + (f" {'domain':>7} {'fields':>7}" if domain else "")
    )
    for r in rows:
        print(
            f"{r['build']:<52} {r['mb']:>6.0f} {r['mb'] / rows[0]['mb']:>6.2f} {r['mean_kld']:>9.4f} "
            f"{r['kld_p99']:>8.3f} {r['top1_agreement']:>6.3f} {r['perplexity']:>6.2f} {r['pp128']:>7.0f} "
            f"{r['tg128']:>7.1f}" + (f" {r['domain_accuracy']:>7.3f} {r['domain_fields']:>7.3f}" if domain else "")
        )
    print(f"source perplexity {rows[0]['reference_perplexity']:.2f}")


def main() -> None:
    from slmops import quality, sources
    from slmops.config import home

    os.environ.pop(quality.SET_ENV, None)  # the whole shipped corpus
    embedded = sources.resolve(None).checkpoint
    results = {}
    print("source 1: the dithered stand-in", flush=True)
    stand_in = dithered(embedded, home() / "bench" / f"smollm2-dithered-{SEED}")
    results["dithered"] = measure(stand_in, BUILDS, None)
    print("source 2: the order-record fine-tune (made once, a few minutes)", flush=True)
    tuned = finetuned(embedded, home() / "bench" / f"smollm2-orders-{SEED}", progress=lambda m: print(" ", m))
    own = {"precision": "int4", "algorithm": "gptq", "calibration": make_domain.TRAIN}
    results["fine-tune"] = measure(tuned, [*FINETUNE_BUILDS, (OWN_CALIBRATION, own)], make_domain.EVAL)
    table("dithered stand-in (source: torch)", results["dithered"])
    table(f"fine-tune, {make_domain.EVAL.name} held out (source: torch)", results["fine-tune"])
    print("domain: share of held-out rows with every field right (under the schema); fields: share of fields right")
    if "--json" in sys.argv:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
