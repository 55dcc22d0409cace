"""The benchmarker's own overhead: its decode tok/s on the default int4 model against a bare ORT GenAI
generation loop timed in the same run (target: within 5%). Where llama-cpp-python is installed, the default
model's GGUF runs through it too and the ratio is printed (optional, not a dependency)."""

from __future__ import annotations

import time
from pathlib import Path

PROMPT_TOKENS, NEW_TOKENS, RUNS = 64, 64, 5


def bare_loop(model_dir: Path) -> float:
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    tokenizer = og.Tokenizer(model)
    tokens = list(tokenizer.encode("Small language models run on laptops and edge devices. " * 16))[:PROMPT_TOKENS]
    decoded, seconds = 0, 0.0
    for i in range(RUNS + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(
            max_length=len(tokens) + NEW_TOKENS, min_length=len(tokens) + NEW_TOKENS, do_sample=False
        )
        gen = og.Generator(model, params)
        gen.append_tokens(tokens)
        gen.generate_next_token()
        start, n = time.perf_counter(), 0
        while not gen.is_done():
            gen.generate_next_token()
            n += 1
        if i:  # the first run is the warm-up
            decoded, seconds = decoded + n, seconds + time.perf_counter() - start
    return decoded / seconds


def llama_cpp(gguf: Path) -> float | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf), n_ctx=512, verbose=False)
    llm("Hello", max_tokens=8)
    start = time.perf_counter()
    out = llm("Small language models run on laptops and edge devices. " * 4, max_tokens=NEW_TOKENS)
    return out["usage"]["completion_tokens"] / (time.perf_counter() - start)


def main() -> None:
    from slmops.build import convert, sources
    from slmops.plugin import provided

    model_dir = convert.convert(None, {"precision": "int4"}).path
    bench = next(b for b in provided.benchmarkers() if b.name == "ort-genai")
    bare = bare_loop(model_dir)
    ours = bench.run(
        model_dir, {"lengths": [PROMPT_TOKENS], "runs": RUNS, "warmup": 1, "max_new_tokens": NEW_TOKENS}, lambda s: None
    )["decode_tok_s"]
    bare_again = bare_loop(model_dir)  # bracket ours between two bare runs: machines are noisy
    reference = (bare + bare_again) / 2
    print(f"{'loop':<26} {'decode tok/s':>12}")
    print(f"{'bare ORT GenAI (mean of 2)':<26} {reference:>12.1f}")
    print(f"{'slmops benchmarker':<26} {ours:>12.1f}")
    print(f"\nslmops / bare: {ours / reference:.3f} (target within 5%: 0.95-1.05)")
    other = llama_cpp(sources.default_gguf())
    if other is None:
        print("llama-cpp-python not installed: skipped the GGUF comparison")
    else:
        print(f"llama.cpp on the Q4_1 GGUF: {other:.1f} tok/s; slmops int4 / llama.cpp: {ours / other:.2f}")


if __name__ == "__main__":
    main()
