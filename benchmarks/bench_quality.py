"""The default model's builds side by side in one run: size, faithfulness to the source and speed of slmops's int4
(the GGUF's own blocks, at int8 activations with float outlier channels as deployed, in slmops's GGUF kernel; the same
without the kernel, MatMulNBits with float corrections; at float activations, exact), the earlier RTN int4, int8, and
llama.cpp on the same GGUF file.

Faithfulness is against the source, the fp32 build of the GGUF's dequantized weights, on slmops's corpus (512-token
windows, the second half of each scored): every build, llama.cpp included, is scored on the same tokens by the same
code (quality.score). Speed: prefill of 128 tokens (pp128) and greedy decode of 128 (tg128), best of 3 after a
warm-up. llama.cpp comes from llama-cpp-python (make bench builds it once); without it its row is skipped."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

PP, TG, RUNS = 128, 128, 3
BUILDS = [
    ("slmops int4 gguf (deployed)", {"precision": "int4", "algorithm": "gguf"}),
    # The same blocks where the GGUF kernel cannot be built: MatMulNBits with float corrections.
    ("slmops int4 gguf, no kernel", {"precision": "int4", "algorithm": "gguf", "env": {"SLMOPS_GGUF_KERNEL": "0"}}),
    ("slmops int4 gguf, float activations", {"precision": "int4", "algorithm": "gguf", "accuracy_level": 1}),
    ("slmops int4 rtn_last asym (before)", {"precision": "int4", "algorithm": "rtn_last", "symmetric": False}),
    ("slmops int8", {"precision": "int8"}),
]


def prompt_tokens(encode) -> list[int]:
    from slmops.measure import quality

    text = " ".join(r["text"] for r in quality.load_set())
    return encode(text)[:PP]


def ort_speed(model_dir: Path, tokens: list[int]) -> tuple[float, float]:
    from slmops.run.runtime import Session

    session = Session(model_dir)
    best_pp, best_tg = 0.0, 0.0
    for _ in range(RUNS + 1):
        gen = session.generator(PP + TG + 1, do_sample=False, min_length=PP + TG + 1)
        start = time.perf_counter()
        gen.append_tokens(tokens)
        gen.get_next_tokens()
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(TG):
            gen.generate_next_token()
        best_pp, best_tg = max(best_pp, PP / prefill), max(best_tg, TG / (time.perf_counter() - start))
    return best_pp, best_tg


def llama_cpp(gguf: Path):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from slmops.host.cpus import allowed_cpus

    threads = allowed_cpus()  # the CPUs slmops itself may use, so the two are timed on the same share
    scorer = Llama(model_path=str(gguf), n_ctx=512, logits_all=True, n_threads=threads, verbose=False)

    def logits(tokens: list[int]) -> np.ndarray:
        scorer.reset()
        scorer.eval(tokens)
        return np.array(scorer.scores[: len(tokens)], dtype=np.float32)

    def speed(tokens: list[int]) -> tuple[float, float]:
        llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, verbose=False)
        best_pp, best_tg = 0.0, 0.0
        for _ in range(RUNS + 1):
            llm.reset()
            start = time.perf_counter()
            llm.eval(tokens)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(TG):
                llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
            best_pp, best_tg = max(best_pp, PP / prefill), max(best_tg, TG / (time.perf_counter() - start))
        return best_pp, best_tg

    return logits, speed


def build(convert, options: dict) -> Path:
    """convert.convert with the build's environment (its "env") set for the call."""
    options = dict(options)
    env = options.pop("env", {})
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return convert.convert(None, options).path
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def main() -> None:
    from slmops import progress
    from slmops.build import convert, sources
    from slmops.host.fsutil import dir_size
    from slmops.measure import quality
    from slmops.run.runtime import Session

    os.environ.pop(quality.SET_ENV, None)  # the whole shipped corpus
    reference = convert.reference(None, {}).path
    builds = {label: build(convert, options) for label, options in BUILDS}
    ref = Session(reference)
    candidates = {label: Session(path).logits for label, path in builds.items()}
    gguf = sources.default_gguf()
    llama = llama_cpp(gguf)
    if llama:
        candidates["llama.cpp Q4_1 (same GGUF)"] = llama[0]
    with progress.step(f"Scoring {len(candidates)} builds against the fp32 source on the corpus"):
        scored = quality.score(ref.logits, candidates, ref.tokens, prefix=ref.prefix)
    scores = {k: q.to_json() for k, q in scored.items()}
    print(f"  {next(iter(scores.values()))['positions']} positions", flush=True)
    tokens = prompt_tokens(ref.encode)
    rows = [
        {"build": "fp32 (the source's weights)", "mb": dir_size(reference) / 1e6, "speed": ort_speed(reference, tokens)}
    ]
    rows += [
        {"build": label, "mb": dir_size(path) / 1e6, "speed": ort_speed(path, tokens), **scores[label]}
        for label, path in builds.items()
    ]
    if llama:
        label = "llama.cpp Q4_1 (same GGUF)"
        rows.append({"build": label, "mb": gguf.stat().st_size / 1e6, "speed": llama[1](tokens), **scores[label]})
    base = next((r for r in rows if r["build"].startswith("llama.cpp")), None)
    print(
        f"\n{'build':<36} {'MB':>6} {'x fp32':>6} {'mean KLD':>9} {'KLD p99':>8} {'top-1':>6} {'PPL':>6} "
        f"{'pp128':>7} {'tg128':>7} {'pp/llama':>8} {'tg/llama':>8}"
    )
    for r in rows:
        pp, tg = r["speed"]
        ratio = (f"{pp / base['speed'][0]:>8.2f} {tg / base['speed'][1]:>8.2f}") if base else f"{'-':>8} {'-':>8}"
        q = (
            f"{r['mean_kld']:>9.4f} {r['kld_p99']:>8.3f} {r['top1_agreement']:>6.3f} {r['perplexity']:>6.2f}"
            if "mean_kld" in r
            else f"{0:>9.4f} {0:>8.3f} {1:>6.3f} {scores[next(iter(scores))]['reference_perplexity']:>6.2f}"
        )
        print(f"{r['build']:<36} {r['mb']:>6.0f} {r['mb'] / rows[0]['mb']:>6.2f} {q} {pp:>7.0f} {tg:>7.1f} {ratio}")
    if not base:
        print("\nllama-cpp-python is not installed (make bench builds it): the llama.cpp row was skipped")


if __name__ == "__main__":
    main()
