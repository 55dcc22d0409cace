"""Benchmarker: times ORT GenAI generation in-process (load, TTFT, prefill and decode speed, latency,
memory, CPU) over a sweep of prompt lengths, then a soak for memory growth."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmops.api import Benchmarker, BenchmarkResult, Session, SweepRow, allowed_cpus, hookimpl, in_child

FILLER = (
    "Small language models run on laptops and edge devices, where memory and power are scarce. "
    "Quantization stores weights in fewer bits so models load faster and answer sooner. "
)


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: VmHWM), so the benchmark reports its own peak, not that of work the
    process did before (a conversion in the same `deploy` run). False where the kernel does not allow it."""
    import ctypes
    import gc

    gc.collect()
    try:  # hand freed heap back to the OS first, or it stays counted as resident
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory in MB: Linux's VmHWM, Windows' peak working set; elsewhere (macOS, whose ru_maxrss is in
    bytes where Linux's is in KiB) psutil's current RSS, a lower bound."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import psutil

    info = psutil.Process().memory_info()
    return getattr(info, "peak_wset", info.rss) / 2**20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class OrtGenAIBenchmarker(Benchmarker):
    name = "ort-genai"
    description = "onnxruntime_genai generation loop, greedy, timed per token"

    def check(self, model_dir: Path) -> str | None:
        return (
            None
            if (Path(model_dir) / "genai_config.json").is_file()
            else "not an ORT GenAI folder (no genai_config.json)"
        )

    def run(self, model_dir: Path, settings: dict[str, Any], progress: Callable[[str], None]) -> BenchmarkResult:
        import psutil

        proc = psutil.Process()
        windowed = reset_peak_rss()
        session = Session(Path(model_dir))  # timed as deployed: with its LoRA switched on
        load_s, context = session.load_s, session.context_length
        max_new = int(settings.get("max_new_tokens", 32))
        filler = session.tokens(FILLER * 8)
        runs = int(settings.get("runs", 5))

        lengths = sorted(
            {min(int(n), context - max_new - 1) for n in settings.get("lengths", [16, 64, 256]) if int(n) > 0}
        )
        # process_time is the scheduler's exact CPU time (psutil's cpu_times is sampled in 10 ms ticks, which put a
        # short run over 100%); the share is of the CPUs this process may use (affinity, cgroup quota).
        cpu0, wall0 = time.process_time(), time.perf_counter()
        prompts = {length: prompt(session, filler, length) for length in lengths}
        for _ in range(int(settings.get("warmup", 1))):
            for tokens in prompts.values():
                timed_generation(session, tokens, max_new)
        # The lengths take turns (16, 128, 512, 16, 128, ...), so a burst of load from another program falls on every
        # length alike; each reports its median and best run.
        runs_of: dict[int, list[dict[str, float]]] = {length: [] for length in lengths}
        for i in range(runs):
            for length, tokens in prompts.items():
                progress(f"prompt {length} tokens: run {i + 1}")
                runs_of[length].append(timed_generation(session, tokens, max_new))
        sweep: list[SweepRow] = []
        all_runs = [r for done in runs_of.values() for r in done]
        for length, done in runs_of.items():
            speeds = [r["decode_tokens"] / r["decode_s"] for r in done if r["decode_s"]]
            sweep.append(
                {
                    "prompt_tokens": length,
                    "ttft_ms_p50": 1000 * percentile([r["ttft_s"] for r in done], 0.5),
                    "prefill_tok_s": length / percentile([r["ttft_s"] for r in done], 0.5),
                    "decode_tok_s": percentile(speeds, 0.5),
                    "decode_tok_s_best": max(speeds, default=float("nan")),
                    "latency_ms_p50": 1000 * percentile([r["total_s"] for r in done], 0.5),
                    "latency_ms_p95": 1000 * percentile([r["total_s"] for r in done], 0.95),
                    "generated_tokens": sum(r["generated_tokens"] for r in done),
                    "runs": len(done),
                }
            )
        cpu1, wall1 = time.process_time(), time.perf_counter()
        if lengths:
            progress("CPU time per decoded token, on one thread")
            costs = in_child(decode_costs, str(model_dir), lengths, runs, max_new)
            for row in sweep:
                row["decode_cpu_ms_per_token"] = costs[row["prompt_tokens"]]
        cpu_util = (cpu1 - cpu0) / (wall1 - wall0) / allowed_cpus()
        soak_n = int(settings.get("soak_requests", 0))
        rss_before = proc.memory_info().rss
        tokens = prompt(session, filler, lengths[0] if lengths else 16)
        for i in range(soak_n):
            if i % 5 == 0:
                progress(f"soak: request {i + 1} of {soak_n}")
            timed_generation(session, tokens, max_new)
        rss_after = proc.memory_info().rss
        decode_s = sum(r["decode_s"] for r in all_runs)
        return {
            "benchmarker": self.name,
            "load_s": load_s,
            "ttft_ms_p50": 1000 * percentile([r["ttft_s"] for r in all_runs], 0.5),
            "decode_tok_s": sum(r["decode_tokens"] for r in all_runs) / decode_s if decode_s else float("nan"),
            "latency_ms_p50": 1000 * percentile([r["total_s"] for r in all_runs], 0.5),
            "latency_ms_p95": 1000 * percentile([r["total_s"] for r in all_runs], 0.95),
            "peak_rss_mb": peak_rss_mb(),
            "peak_rss_scope": "this benchmark" if windowed else "process lifetime",
            "cpu_utilisation": cpu_util,
            "soak_requests": soak_n,
            "rss_growth_mb": (rss_after - rss_before) / 1e6,
            "max_new_tokens": max_new,
            "sweep": sweep,
        }


def prompt(session: Session, filler: list[int], length: int) -> list[int]:
    """length tokens of one text, as the tokenizer would feed it: its BOS (if any) once, then the filler."""
    reps = session.prefix + filler * (length // len(filler) + 1)
    return reps[:length]


def timed_generation(session: Session, tokens: list[int], max_new: int) -> dict[str, float]:
    """One greedy generation of max_new tokens after the prompt tokens, timed: first token, decode, and the CPU
    time of the decode (every thread of this process)."""
    generator = session.generator(len(tokens) + max_new, min_length=len(tokens) + max_new, do_sample=False)
    start = time.perf_counter()
    generator.append_tokens(tokens)
    generator.generate_next_token()
    first, cpu_first = time.perf_counter(), time.process_time()
    n = 1
    while not generator.is_done():
        generator.generate_next_token()
        n += 1
    end = time.perf_counter()
    return {
        "decode_cpu_s": time.process_time() - cpu_first,
        "ttft_s": first - start,
        "decode_tokens": n - 1,
        "decode_s": end - first,
        "total_s": end - start,
        "prompt_tokens": len(tokens),
        "generated_tokens": n,
    }


def decode_costs(model_dir: str, lengths: list[int], runs: int, max_new: int) -> dict[int, float]:
    """In a child process: the median CPU ms a decoded token costs at each prompt length, on one CPU and one thread
    (ONNX Runtime, whose pool the GGUF kernel runs on). That is the work a token takes, which grows with a build's context and not
    with another program's load, where wall-clock time and the CPU time of two threads (spinning workers waiting
    for a descheduled one) do (docs/architecture.md, "The measurements behind the constants")."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    session = Session(Path(model_dir), threads=1)
    filler = session.tokens(FILLER * 8)
    prompts = {length: prompt(session, filler, length) for length in lengths}
    for tokens in prompts.values():
        timed_generation(session, tokens, max_new)  # warm-up
    per_token: dict[int, list[float]] = {length: [] for length in lengths}
    for _ in range(runs):
        for length, tokens in prompts.items():
            r = timed_generation(session, tokens, max_new)
            if r["decode_tokens"]:
                per_token[length].append(1000 * r["decode_cpu_s"] / r["decode_tokens"])
    return {length: percentile(costs, 0.5) for length, costs in per_token.items()}


@hookimpl
def register_benchmarkers(register):
    register(OrtGenAIBenchmarker())
