"""`--report DIR`: a Markdown report with PNG plots, latency and throughput against input length, quality against
size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmops.host.fsutil import write_text_atomic
from slmops.measure import plots
from slmops.measure.bench import extra_metrics
from slmops.results import BenchResult


def write_report(folder: Path, bench: BenchResult | None = None, compare: dict[str, Any] | None = None) -> Path:
    """A Markdown report with PNG plots: latency and throughput against input length; quality against size."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["# slmops benchmark report", ""]
    if bench:
        lines += ["## Speed", ""]
        sweep = bench.sweep
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
            f"Decode {bench.decode_tok_s:.1f} tok/s, TTFT {bench.ttft_ms_p50:.1f} ms (benchmarker {bench.benchmarker})."
        ]
        m = bench.metrics
        if "load_s" in m and "peak_rss_mb" in m:
            lines += [
                f"Load {m['load_s']:.2f} s, peak RSS {m['peak_rss_mb']:.0f} MB, CPU {100 * m.get('cpu_utilisation', 0):.0f}%, "
                f"RSS growth {m.get('rss_growth_mb', 0):.1f} MB over {bench.settings.get('soak_requests', 0)} requests."
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
    plots.render_in_subprocess(folder, bench.to_json() if bench else None, compare)
    report = folder / "report.md"
    write_text_atomic(report, "\n".join(lines) + "\n")
    return report
