"""int4 routes for a Hugging Face (float) source, side by side in one run with llama.cpp's own quantizers on the same
checkpoint: size, bits per weight, faithfulness to the source (torch) and speed of slmops's gptq (the default int4 for
float sources: error-compensating rounding, Q4_0 to Q8_0 blocks within llama.cpp Q4_K_M's bytes, in slmops's GGUF
kernel), imatrix (scale and float min per block of 32, searched), the model builder's RTN int4 (asymmetric with
lm_head at 8 bits, and its symmetric default), ONNX Runtime's HQQ (float zero points), int8; and llama.cpp Q4_0,
Q4_K_M, Q4_K_M + imatrix, Q5_K_M + imatrix, Q6_K, Q8_0 (benchmarks/llama_cpp_quants.py: its tools built once from the
llama.cpp that the llama-cpp-python make bench installs vendors; the imatrix on slmops's calibration text). Every row
is scored by the same code on the same tokens; ratios are taken against llama.cpp Q4_K_M + imatrix, and the default
int4's decode speed is swept over prompt lengths beside it.

Two float sources (benchmarks/float_sources.py, made from the embedded SmolLM2 since none can be downloaded): the
dithered stand-in (its 4-bit weights moved off the grid) and a real fine-tune (on the order-record task of
benchmarks/make_domain.py). Faithfulness: KL(source || build) per position, torch against ORT GenAI or llama.cpp, on
slmops's corpus (512-token windows, the second half of each scored). On the fine-tune, also its held-out domain rows:
accuracy (every field of the record right, under the schema: llama.cpp keeps to it by its grammar for the schema)
and fields, beside its fp32 build's; and gptq calibrated on the fine-tune's own training rows (--calibration).
`--source dithered` or `--source fine-tune` runs one source (each is one to two hours on 2 cores)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import llama_cpp_quants  # noqa: E402
from bench_quality import llama_cpp, ort_speed, prompt_tokens  # noqa: E402 (the same measurements as the GGUF bench)
from float_sources import SEED, dithered, finetuned, make_domain  # noqa: E402

Q5_BUDGET = "int4 gptq within Q5_K_M's bytes (deploy's next candidate)"
BUILDS = [
    ("fp32", {"precision": "fp32"}),
    ("int4 gptq (default for float sources)", {"precision": "int4", "algorithm": "gptq"}),
    (
        Q5_BUDGET,
        {"precision": "int4", "algorithm": "gptq", "plugin_options": {"gptq": {"budget": "Q5_K_M"}}},
    ),
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
        Q5_BUDGET,
        "int4 imatrix",
        "int4 rtn_last asym (builder)",
        "int8 q8_0 (default for float sources)",
    }
]
OWN_CALIBRATION = "int4 gptq, calibrated on the fine-tune's training rows"


SWEEP, SWEEP_NEW = (16, 128, 512), 64  # decode speed after prompts of these lengths (issue 28: >= 1.2x llama.cpp)
SWEEP_ROUNDS = 3
# llama.cpp's Q4_K_M + imatrix file converted by slmops with its own blocks (the GGUF kernel holds Q4_K and Q6_K):
# what a user who already has that file deploys
OWN_BLOCKS = f"slmops on the {llama_cpp_quants.ANCHOR} file"
SWEPT = ("int4 gptq (default for float sources)", OWN_BLOCKS, llama_cpp_quants.ANCHOR)


def parameters(checkpoint: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), "np") as f:
        return sum(int(np.prod(f.get_slice(name).get_shape())) for name in f.keys())


def ort_decoder(model_dir: Path) -> Callable[[list[int]], float]:
    """Decode tok/s of SWEEP_NEW greedy tokens after a prompt, ORT GenAI."""
    from slmops.run.runtime import Session

    session = Session(model_dir)

    def decode(prompt: list[int]) -> float:
        gen = session.generator(len(prompt) + SWEEP_NEW, do_sample=False, min_length=len(prompt) + SWEEP_NEW)
        gen.append_tokens(prompt)
        gen.get_next_tokens()
        start = time.perf_counter()
        for _ in range(SWEEP_NEW - 1):
            gen.generate_next_token()
        return (SWEEP_NEW - 1) / (time.perf_counter() - start)

    return decode


def llama_decoder(gguf: Path) -> Callable[[list[int]], float]:
    """The same for llama.cpp (llama-cpp-python, the CPUs slmops may use)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=1024, n_batch=1024, n_threads=llama_cpp_quants.threads(), verbose=False)

    def decode(prompt: list[int]) -> float:
        llm.reset()
        llm.eval(prompt)
        start = time.perf_counter()
        for _ in range(SWEEP_NEW - 1):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return (SWEEP_NEW - 1) / (time.perf_counter() - start)

    return decode


def decode_sweep(builds: dict[str, Path], tokens: list[int]) -> dict[str, dict[int, float]]:
    """Decode tok/s after each SWEEP-long prompt, per build (a folder: ORT GenAI; a GGUF file: llama.cpp), the best
    of SWEEP_ROUNDS. The builds take turns a round each, one loaded at a time, and a round runs the lengths in turn
    twice: this machine kind's speed drifts by up to 2x within minutes (other tenants), and so it weighs on every
    build and length alike, where one build's lengths measured one after another gave slowdowns off by 0.2x."""
    import gc

    best = {label: dict.fromkeys(SWEEP, 0.0) for label in builds}
    for _ in range(SWEEP_ROUNDS):
        for label, path in builds.items():
            decode = ort_decoder(path) if path.is_dir() else llama_decoder(path)
            decode(tokens[: SWEEP[0]])  # warm-up
            for length in [*SWEEP, *SWEEP]:
                best[label][length] = max(best[label][length], decode(tokens[:length]))
            del decode
            gc.collect()  # its runtime's threads gone before the next build's start
    return best


def answer_windows(checkpoint: Path, rows: list[dict]) -> list[tuple[list[int], int]]:
    """Each domain row as the model sees it answered: its prompt under the source's chat template, then the expected
    answer and the end of the turn; with the position where the answer starts."""
    from transformers import AutoTokenizer

    from slmops.measure.quality import answer_text

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    windows = []
    for row in rows:
        asked = [{"role": "user", "content": row["prompt"]}]
        prompt = tokenizer.apply_chat_template(asked, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        answer = tokenizer(answer_text(row["expected"]) + tokenizer.eos_token, add_special_tokens=False).input_ids
        windows.append((ids + answer, len(ids)))
    return windows


def answer_kld(reference, candidates: dict, windows: list[tuple[list[int], int]]) -> dict[str, float]:
    """Mean KL(source || build) over the answers' tokens, teacher-forced: thousands of positions where domain
    accuracy has one verdict a row, and the ones a fine-tune changed most (a build that rounds a fine-tune of a
    4-bit model back onto its base loses them, and the shipped corpus barely shows it)."""
    from slmops.measure.quality import kl, log_softmax

    klds: dict[str, list[np.ndarray]] = {label: [] for label in candidates}
    for tokens, start in windows:
        lr = log_softmax(reference(tokens)[start - 1 : -1])
        for label, logits in candidates.items():
            lc = log_softmax(logits(tokens)[start - 1 : -1])
            klds[label].append(kl(lr, lc))
    return {label: float(np.concatenate(k).mean()) for label, k in klds.items()}


def measure(source: Path, builds_asked: list[tuple[str, dict]], domain: Path | None) -> list[dict]:
    """Each build of source and each llama.cpp recipe on it: MB, bits per weight, quality against torch on the shipped
    corpus, speed, and (with domain) the held-out rows' shares."""
    from slmops import progress
    from slmops.build import convert
    from slmops.errors import SlmopsError
    from slmops.host.fsutil import dir_size
    from slmops.measure import quality
    from slmops.measure.domain import score
    from slmops.run.chat import OrtGenAIChat
    from slmops.run.runtime import Session

    builds, refused = {}, []
    for label, options in builds_asked:
        start = time.perf_counter()
        try:
            builds[label] = convert.convert(str(source), options).path
        except SlmopsError as e:  # a route that refuses this source (imatrix on a fine-tune of a 4-bit model) is a row
            refused.append({"build": label, "refused": str(e)})
            print(f"  {label}: refused: {e}", flush=True)
            continue
        print(f"  {label}: {time.perf_counter() - start:.0f} s", flush=True)
    llama = {}
    if importlib.util.find_spec("llama_cpp") is None:
        print("  llama-cpp-python is not installed (make bench builds it): the llama.cpp rows are skipped")
    else:
        try:
            llama = llama_cpp_quants.quants(source, llama_cpp_quants.calibration_file())
        except RuntimeError as e:  # a tool that cannot be built or run here: said in the output, the rest goes on
            print(f"  llama.cpp rows skipped: {e}")
    if llama_cpp_quants.ANCHOR in llama:
        options = {"precision": "int4", "algorithm": "gguf"}
        builds[OWN_BLOCKS] = convert.convert(str(llama[llama_cpp_quants.ANCHOR]), options).path
    fp32 = Session(builds["fp32"])
    candidates = {label: Session(path).logits for label, path in builds.items()}
    runners = {label: llama_cpp(path) for label, path in llama.items()}
    candidates.update({label: runner[0] for label, runner in runners.items()})
    reference = torch_logits(source)
    with progress.step(f"Scoring {len(candidates)} builds against the source (torch) on the corpus"):
        scores = quality.score(reference, candidates, fp32.tokens, prefix=fp32.prefix)
    print(f"  {next(iter(scores.values())).positions} positions", flush=True)
    held_out = quality.load_set(domain) if domain else []
    answers = answer_kld(reference, candidates, answer_windows(source, held_out)) if held_out else {}
    tokens = prompt_tokens(fp32.encode)
    sweep_tokens = fp32.encode(" ".join(r["text"] for r in quality.load_set()))[: max(SWEEP)]
    weights = parameters(source)
    every = {**builds, **llama}
    print("decode speed after prompts of " + ", ".join(map(str, SWEEP)) + " tokens ...", flush=True)
    decode = decode_sweep({label: every[label] for label in SWEPT if label in every}, sweep_tokens)
    rows = []
    for label, path in every.items():
        mb = (dir_size(path) if path.is_dir() else path.stat().st_size) / 1e6
        pp, tg = ort_speed(path, tokens) if path.is_dir() else runners[label][1](tokens)
        row = {"build": label, "mb": mb, "bpw": mb * 8e6 / weights, "pp128": pp, "tg128": tg}
        row.update(scores[label].to_json())
        if label in decode:
            row["decode"] = decode[label]
        if held_out:
            chat = OrtGenAIChat(path) if path.is_dir() else llama_cpp_quants.LlamaCppChat(path, builds["fp32"])
            shares = score(chat, held_out)
            row.update(domain_accuracy=shares["accuracy"], domain_fields=shares["fields"], domain_kld=answers[label])
        rows.append(row)
    return rows + refused


def table(title: str, rows: list[dict]) -> None:
    domain = "domain_accuracy" in rows[0]
    anchor = next((r for r in rows if r["build"] == llama_cpp_quants.ANCHOR), None)
    print(
        f"\n{title:<44} {'MB':>5} {'bpw':>5} {'mean KLD':>8} {'p99':>6} {'top-1':>5} {'PPL':>6} {'pp128':>6} "
        f"{'tg128':>6}"
        + (f" {'domain':>6} {'fields':>6} {'d-KLD':>6}" if domain else "")
        + (" KLD/ll  tg/ll" if anchor else "")
    )
    for r in rows:
        if "refused" in r:
            print(f"{r['build']:<44} refused: {r['refused']}")
            continue
        ratios = f" {r['mean_kld'] / anchor['mean_kld']:>6.2f} {r['tg128'] / anchor['tg128']:>6.2f}" if anchor else ""
        print(
            f"{r['build']:<44} {r['mb']:>5.0f} {r['bpw']:>5.2f} {r['mean_kld']:>8.4f} {r['kld_p99']:>6.3f} "
            f"{r['top1_agreement']:>5.3f} {r['perplexity']:>6.2f} {r['pp128']:>6.0f} {r['tg128']:>6.1f}"
            + (f" {r['domain_accuracy']:>6.3f} {r['domain_fields']:>6.3f} {r['domain_kld']:>6.4f}" if domain else "")
            + ratios
        )
    print(f"source perplexity {rows[0]['reference_perplexity']:.2f}; bpw: the build's bytes x 8 / the source's weights")
    if anchor:
        print(f"KLD/ll, tg/ll: mean KLD and decode speed against {llama_cpp_quants.ANCHOR}")
    swept = [r for r in rows if "decode" in r]
    if swept:
        print(
            f"decode tok/s after a prompt of {', '.join(map(str, SWEEP))} tokens ({SWEEP_NEW} new, best of "
            f"{2 * SWEEP_ROUNDS}, the builds and lengths in turn):"
        )
        for r in swept:
            speeds = [r["decode"][n] for n in SWEEP]
            line = " ".join(f"{v:>7.1f}" for v in speeds)
            slowdown = speeds[0] / speeds[-1]
            print(f"  {r['build']:<42} {line}   {SWEEP[0]} -> {SWEEP[-1]}: {slowdown:.2f}x slower")
        base = next((r for r in swept if r["build"] == llama_cpp_quants.ANCHOR), None)
        for r in swept if base else []:
            if r is not base:
                ratios = " ".join(f"{r['decode'][n] / base['decode'][n]:>6.2f}x" for n in SWEEP)
                print(f"  {'x llama.cpp: ' + r['build']:<42} {ratios}")


def main() -> None:
    parser = argparse.ArgumentParser(description="int4 routes for a float source beside llama.cpp's quantizers")
    parser.add_argument("--source", choices=("dithered", "fine-tune", "both"), default="both")
    parser.add_argument("--json", action="store_true", help="the rows as JSON after the tables")
    args = parser.parse_args()

    from slmops.build import sources
    from slmops.config import home
    from slmops.measure import quality

    os.environ.pop(quality.SET_ENV, None)  # the whole shipped corpus
    embedded = sources.resolve(None).checkpoint
    results = {}
    if args.source != "fine-tune":
        print("source 1: the dithered stand-in", flush=True)
        stand_in = dithered(embedded, home() / "bench" / f"smollm2-dithered-{SEED}")
        results["dithered"] = measure(stand_in, BUILDS, None)
        table("dithered stand-in (source: torch)", results["dithered"])  # printed now: the fine-tune takes an hour more
    if args.source != "dithered":
        print("source 2: the order-record fine-tune (made once, a few minutes)", flush=True)
        tuned = finetuned(embedded, home() / "bench" / f"smollm2-orders-{SEED}", progress=lambda m: print(" ", m))
        own = {"precision": "int4", "algorithm": "gptq", "calibration": make_domain.TRAIN}
        results["fine-tune"] = measure(tuned, [*FINETUNE_BUILDS, (OWN_CALIBRATION, own)], make_domain.EVAL)
        table(f"fine-tune, {make_domain.EVAL.name} held out (source: torch)", results["fine-tune"])
        print(
            "domain: share of held-out rows with every field right (under the schema); fields: share of fields "
            "right; d-KLD: mean KLD on the held-out answers' tokens (teacher-forced, as the corpus)"
        )
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
