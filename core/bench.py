"""`slmops bench` and `slmops validate`: measure a model, compare precisions, and turn the guide's quality
checklist into pass/fail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import convert as conv
from . import implementations, plots, progress, quality
from .chat import OrtGenAIChat
from .config import Config
from .edgecases import run_suite
from .errors import NoImplementation, SlmopsError
from .fsutil import dir_size, write_text_atomic
from .roles import BENCH_RESULT_KEYS


def resolve_target(cfg: Config, target: str) -> Path:
    """A model folder, or the folder of a registered name."""
    path = Path(target).expanduser()
    if path.is_dir():
        if not (path / "genai_config.json").is_file():
            raise SlmopsError(f"{target} is not an ORT GenAI model folder (no genai_config.json)")
        return path
    from .registry import find_runnable, open_registry

    return Path(find_runnable(open_registry(cfg), target).path)


def benchmarker_for(model_dir: Path, name: str | None = None):
    items = implementations.benchmarkers()
    if name:
        return implementations.by_name(items, name, "benchmarker")
    reasons = []
    for b in items:
        why = b.check(model_dir)
        if why is None:
            return b
        reasons.append(f"{b.name}: {why}")
    raise SlmopsError(f"no benchmarker can measure {model_dir}: " + "; ".join(reasons))


# The rows of `slmops bench`'s summary table, in order.
SUMMARY_KEYS = (
    "load_s",
    "ttft_ms_p50",
    "decode_tok_s",
    "latency_ms_p50",
    "latency_ms_p95",
    "peak_rss_mb",
    "cpu_utilisation",
    "rss_growth_mb",
)


def measure(model_dir: Path, settings: dict[str, Any], benchmarker: str | None = None) -> dict[str, Any]:
    """The chosen benchmarker's result, held to the contract: BENCH_RESULT_KEYS present and numbers."""
    bench = benchmarker_for(model_dir, benchmarker)
    with progress.step(f"Benchmarking with {bench.name}"):
        result = bench.run(model_dir, settings, lambda text: None)
    if not isinstance(result, dict):
        raise SlmopsError(f"benchmarker {bench.name!r} returned {type(result).__name__}, not a dict of results")
    missing = [k for k in BENCH_RESULT_KEYS if not isinstance(result.get(k), (int, float))]
    if missing:
        raise SlmopsError(
            f"benchmarker {bench.name!r} returned no number for {', '.join(missing)}; "
            f"every benchmarker must return {', '.join(BENCH_RESULT_KEYS)} (docs/plugins.md)"
        )
    result.setdefault("benchmarker", bench.name)
    result["size_bytes"] = dir_size(model_dir)
    return result


def extra_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers a benchmarker returned beyond the summary's and the run's settings: shown in the table and the
    report as they are."""
    known = {*BENCH_RESULT_KEYS, *SUMMARY_KEYS, "soak_requests", "max_new_tokens", "size_bytes"}
    return {
        k: v for k, v in result.items() if k not in known and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def reference_for(model_dir: Path, reference: str | None = None) -> Path:
    """The fp32 build of the model's own source (from its manifest), made through convert and its cache."""
    if reference:
        return Path(reference)
    manifest = conv.read_manifest(model_dir)
    if not manifest:
        raise SlmopsError(
            f"{model_dir} has no slmops manifest, so its source is unknown; pass --reference with an fp32 model folder"
        )
    options = dict(manifest["options"])
    if options.get("precision") == "fp32":
        return model_dir
    options.update(precision="fp32", adapter=Path(options["adapter"]) if options.get("adapter") else None)
    source = manifest["source"]["path"] if manifest["source"]["kind"] != "default" else None
    return Path(conv.convert(source, options)["path"])


def quality_of(model_dir: Path, reference: Path, domain: Path | None = None) -> dict[str, Any]:
    with progress.step("Measuring quality against the fp32 reference"):
        result = quality.compare(model_dir, reference)
    if domain:
        rows = quality.load_set(domain)
        with progress.step(f"Scoring the domain set {domain.name}"):
            result["domain"] = quality.domain_score(OrtGenAIChat(model_dir), rows)
    return result


def edge_cases(model_dir: Path) -> list[dict[str, Any]]:
    with progress.step("Running the edge-case suite"):
        return run_suite(OrtGenAIChat(model_dir))


def compare_precisions(
    source: str | None, base_options: dict[str, Any], settings: dict[str, Any], thresholds: dict[str, float]
) -> dict[str, Any]:
    """Build the fp32, int8 and int4 candidates (cached), measure each, and recommend the smallest that passes."""
    builds, skipped = {}, []
    for label, opts in reversed(conv.CANDIDATES):
        try:
            builds[label] = conv.convert(source, {**base_options, **opts})
        except NoImplementation as e:  # e.g. int4 gguf for a checkpoint source
            skipped.append({"build": label, "why": str(e)})
    reference = Path(builds["fp32"]["path"])
    rows = []
    for label, build in builds.items():
        path = Path(build["path"])
        speed = measure(path, {**settings, "soak_requests": 0})
        q = quality.compare(path, reference)
        rows.append(
            {
                "build": label,
                "path": str(path),
                "size_mb": build["output_bytes"] / 1e6,
                "decode_tok_s": speed["decode_tok_s"],
                "ttft_ms": speed["ttft_ms_p50"],
                **q,
            }
        )
    base = rows[0]
    for r in rows:
        r["size_ratio"] = r["size_mb"] / base["size_mb"]
        r["speed_ratio"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["passes"] = quality.passes(r, thresholds)
    passing = sorted((r for r in rows if r["passes"]), key=lambda r: r["size_mb"])
    gate = f"max KLD {thresholds['max_kld']} and min top-1 {thresholds['min_top1']}"
    choice = passing[0] if passing else base
    why = (
        f"{choice['build']} is the smallest build within {gate}"
        f" ({choice['size_ratio']:.2f}x fp32 size, {choice['speed_ratio']:.2f}x fp32 decode speed)"
        if passing
        else f"no build is within {gate}; fp32 is the source's own precision (loosen [validate] to trade quality for size)"
    )
    return {"rows": rows, "recommendation": choice["build"], "why": why, "skipped": skipped}


def validate(
    model_dir: Path,
    cfg: Config,
    reference: str | None = None,
    domain: Path | None = None,
    measured_quality: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The guide's quality checklist as pass/fail rows (quality already measured against the reference may be passed in)."""
    v, b = cfg.section("validate"), cfg.section("bench")
    checks = []
    q = measured_quality or quality_of(model_dir, reference_for(model_dir, reference), domain)
    checks.append(
        {
            "check": "quality: mean KLD",
            "ok": q["mean_kld"] <= v["max_kld"],
            "value": round(q["mean_kld"], 4),
            "limit": f"<= {v['max_kld']}",
        }
    )
    checks.append(
        {
            "check": "quality: top-1 agreement",
            "ok": q["top1_agreement"] >= v["min_top1"],
            "value": round(q["top1_agreement"], 4),
            "limit": f">= {v['min_top1']}",
        }
    )
    if q.get("domain") and q["domain"]["accuracy"] is not None:
        checks.append(
            {
                "check": "domain set accuracy",
                "ok": q["domain"]["accuracy"] >= 0.5,
                "value": q["domain"]["accuracy"],
                "limit": ">= 0.5",
            }
        )
    chat = OrtGenAIChat(model_dir)
    usage: dict[str, Any] = {}
    with progress.step("Checking the response format"):
        answer = "".join(
            chat.stream(
                [{"role": "user", "content": "What is the capital of France?"}],
                {"max_new_tokens": 24, "temperature": 0},
                usage,
            )
        )
    leaked = [t for t in chat.chosen.family.markers if t in answer]
    checks.append(
        {
            "check": "response format",
            "ok": bool(answer.strip()) and not leaked,
            "value": repr(answer[:60]),
            "limit": "non-empty, no template tokens",
        }
    )
    settings = {**b, "soak_requests": v["soak_requests"], "runs": max(2, b["runs"])}
    m = measure(model_dir, settings)
    checks.append(
        {
            "check": "no memory leak over the soak",
            "ok": m["rss_growth_mb"] <= v["max_leak_mb"],
            "value": f"{m['rss_growth_mb']:.1f} MB over {m['soak_requests']} requests",
            "limit": f"<= {v['max_leak_mb']} MB",
        }
    )
    speeds = [s["decode_tok_s"] for s in m["sweep"]]
    spread = max(speeds) / min(speeds) if speeds and min(speeds) > 0 else float("inf")
    checks.append(
        {
            "check": "consistent speed across input lengths",
            "ok": spread <= 2.5,
            "value": f"decode tok/s {', '.join(f'{s:.0f}' for s in speeds)} (max/min {spread:.2f})",
            "limit": "max/min <= 2.5",
        }
    )
    edges = run_suite(chat)
    failed = [e["case"] for e in edges if not e["ok"]]
    checks.append(
        {
            "check": "edge cases handled",
            "ok": not failed,
            "value": f"{len(edges) - len(failed)}/{len(edges)} pass"
            + (f"; failed: {', '.join(failed)}" if failed else ""),
            "limit": "all",
        }
    )
    return {"ok": all(c["ok"] for c in checks), "checks": checks, "quality": q, "bench": m, "edge_cases": edges}


def write_report(folder: Path, bench: dict[str, Any] | None = None, compare: dict[str, Any] | None = None) -> Path:
    """A Markdown report with PNG plots: latency and throughput against input length; quality against size."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["# slmops benchmark report", ""]
    if bench:
        lines += ["## Speed", ""]
        sweep = bench.get("sweep") or []
        if sweep:
            lines += [
                "![speed](speed.png)",
                "",
                "| prompt tokens | TTFT ms | prefill tok/s | decode tok/s | p50 ms | p95 ms |",
                "|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {s['prompt_tokens']} | {s['ttft_ms_p50']:.1f} | {s['prefill_tok_s']:.0f} | {s['decode_tok_s']:.1f} | {s['latency_ms_p50']:.0f} | {s['latency_ms_p95']:.0f} |"
                for s in sweep
            ]
            lines.append("")
        lines += [
            f"Decode {bench['decode_tok_s']:.1f} tok/s, TTFT {bench['ttft_ms_p50']:.1f} ms (benchmarker {bench.get('benchmarker', '?')})."
        ]
        if "load_s" in bench and "peak_rss_mb" in bench:
            lines += [
                f"Load {bench['load_s']:.2f} s, peak RSS {bench['peak_rss_mb']:.0f} MB, CPU {100 * bench.get('cpu_utilisation', 0):.0f}%, "
                f"RSS growth {bench.get('rss_growth_mb', 0):.1f} MB over {bench.get('soak_requests', 0)} requests."
            ]
        extras = extra_metrics(bench)
        if extras:
            lines += ["", "| metric | value |", "|---|---|", *[f"| {k} | {v:g} |" for k, v in extras.items()]]
        lines.append("")
    if compare:
        rows = compare["rows"]
        lines += [
            "## Precisions",
            "",
            "![quality](quality.png)",
            "",
            "| build | MB | x fp32 | decode tok/s | x fp32 | TTFT ms | KLD | top-1 | ppl |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['build']} | {r['size_mb']:.0f} | {r['size_ratio']:.2f} | {r['decode_tok_s']:.1f} | {r['speed_ratio']:.2f} | {r['ttft_ms']:.0f} | {r['mean_kld']:.3f} | {r['top1_agreement']:.3f} | {r['perplexity']:.1f} |"
            for r in rows
        ]
        lines += ["", f"Recommendation: **{compare['recommendation']}**: {compare['why']}.", ""]
    plots.render_in_subprocess(folder, bench, compare)
    report = folder / "report.md"
    write_text_atomic(report, "\n".join(lines) + "\n")
    return report
