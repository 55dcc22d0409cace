"""The tables commands print (stdout), built from the typed results; `--json` prints their to_json() instead."""

from __future__ import annotations

from typing import Any

from slmops import output
from slmops.measure.bench import SUMMARY_KEYS, extra_metrics
from slmops.results import Build, Deployment, Validation

QUALITY_ROWS = (
    "positions",
    "mean_kld",
    "kld_p99",
    "top1_agreement",
    "perplexity",
    "reference_perplexity",
    "mean_delta_p",
)


def route(plan: dict[str, Any]) -> None:
    """convert --dry-run: the route a build would take."""
    rows = [
        {"": "source", "value": f"{plan['source']['path']} ({plan['architecture']})"},
        {"": "route", "value": f"{plan['route']} (cost {plan['cost']})"},
        {"": "precision", "value": plan["options"]["precision"]},
        {
            "": "build folder",
            "value": plan["path"] + (" (cached: nothing to build)" if plan["cached"] else " (would be built)"),
        },
        *[{"": "costlier route", "value": alt} for alt in plan["alternatives"]],
        *[{"": "cannot", "value": why} for why in plan["rejected"]],
    ]
    output.table(rows, ["", "value"], title="convert --dry-run")


def build(result: Build) -> None:
    m = result.manifest
    graph = result.verification["graph"]
    effect = result.verification.get("adapter")
    rows = [
        {"": "model", "value": str(result.path)},
        {"": "status", "value": "cache hit (no rebuild)" if result.cached else "built and verified"},
        {"": "converter", "value": m["converter"] + (f" + {m['quantizer']}" if m["quantizer"] else "")},
        {"": "precision", "value": result.precision},
        {
            "": "graph",
            "value": f"MatMulNBits by bits {graph['matmul_nbits'] or '-'}, block {graph['block_sizes'] or '-'}, "
            f"symmetric {graph['symmetric'] or '-'}, float MatMuls {graph['float_matmuls']}",
        },
        {"": "target", "value": target_text(m)},
        {"": "size", "value": output.human_bytes(result.output_bytes)},
        *[
            {"": "adapter", "value": f"{name} ({path}; max logit change {effect['max_logit_change']})"}
            for name, path in m.get("adapters", {}).items()
            if effect
        ],
        {
            "": "sample",
            "value": repr(result.verification["sample"]["text"]) if result.verification.get("sample") else "-",
        },
        {"": "timings", "value": ", ".join(f"{k} {v}s" for k, v in m["timings"].items())},
    ]
    output.table(rows, ["", "value"])


def target_text(manifest: dict[str, Any]) -> str:
    """What a build's folder runs on: its target and the native code it carries, if any."""
    target, needs = manifest["options"].get("target", "native"), manifest.get("requires")
    if not needs:
        return f"{target}: no native code, runs wherever ONNX Runtime GenAI runs"
    return f"{target}: carries {needs['what']}, runs on {needs['os']} {'/'.join(needs['machine'])} with {', '.join(needs['cpu_flags'])}"


def bench(result: dict[str, Any]) -> None:
    """bench.bench()'s result: the summary, the input-length sweep, the edge cases."""
    b = result["bench"]
    numbers = {"decode_tok_s": b.decode_tok_s, "ttft_ms_p50": b.ttft_ms_p50, **b.metrics}
    summary = [{"metric": k, "value": numbers[k]} for k in SUMMARY_KEYS if k in numbers]
    summary += [{"metric": k, "value": v} for k, v in extra_metrics(b).items()]
    if "quality" in result:
        q = result["quality"].to_json()
        summary += [{"metric": k, "value": q[k]} for k in QUALITY_ROWS]
    elif "quality_skipped" in result:
        summary.append({"metric": "quality", "value": f"not measured: {result['quality_skipped']}"})
    output.table(summary, ["metric", "value"], title=f"benchmark: {result['model']}")
    if b.sweep:
        output.table(
            b.sweep,
            [
                "prompt_tokens",
                "ttft_ms_p50",
                "prefill_tok_s",
                "decode_tok_s",
                "decode_cpu_ms_per_token",
                "latency_ms_p50",
                "latency_ms_p95",
            ],
            title="input-length sweep",
        )
    if result.get("edge_cases"):
        output.table(
            [{**e, "ok": "pass" if e["ok"] else "FAIL"} for e in result["edge_cases"]],
            ["case", "ok", "what"],
            title="edge cases",
        )


def compare(result: dict[str, Any]) -> None:
    """bench --compare: the precision table."""
    output.table(
        [{**r, "passes": "yes" if r["passes"] else "no"} for r in result["rows"]],
        [
            "build",
            "size_mb",
            "size_ratio",
            "decode_tok_s",
            "speed_ratio",
            "ttft_ms",
            "mean_kld",
            "kld_p99",
            "top1_agreement",
            "perplexity",
            "mean_delta_p",
            "passes",
        ],
        title="precisions measured on this machine",
    )


def validation(result: Validation) -> None:
    output.table(
        [{**c.__dict__, "ok": "pass" if c.ok else "FAIL"} for c in result.checks],
        ["check", "ok", "value", "limit"],
        title="validation",
    )


def deployment(result: Deployment) -> None:
    domain = ["domain_accuracy"] if any("domain_accuracy" in row for row in result.tried) else []
    output.table(
        result.tried,
        ["build", "size_mb", "mean_kld", "kld_p99", "top1_agreement", "perplexity", *domain, "chosen"],
        title="builds tried",
    )
    validation(result.validation)
    b = result.validation.bench
    output.table(
        [
            {
                "model": result.name,
                "decode tok/s": b.decode_tok_s,
                "TTFT ms": b.ttft_ms_p50,
                "p50 ms": b.metric("latency_ms_p50"),
                "p95 ms": b.metric("latency_ms_p95"),
                "peak RSS MB": b.metric("peak_rss_mb"),
                "size": output.human_bytes(b.size_bytes),
            }
        ],
        ["model", "decode tok/s", "TTFT ms", "p50 ms", "p95 ms", "peak RSS MB", "size"],
        title="benchmark summary",
    )
