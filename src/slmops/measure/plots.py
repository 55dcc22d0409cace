"""PNG plots for benchmark reports, drawn in a child process: Pillow crashed (SIGSEGV in Image.new) inside a
process that had loaded the ORT GenAI and Foundry Local native libraries."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from slmops import extras
from slmops.errors import SlmopsError


def render_in_subprocess(folder: Path, bench: dict[str, Any] | None, compare: dict[str, Any] | None) -> None:
    extras.need("report", "drawing the report's plots")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"bench": bench, "compare": compare}, f, default=str)
    done = subprocess.run(
        [sys.executable, "-m", "slmops.measure.plots", f.name, str(folder)], capture_output=True, text=True
    )
    Path(f.name).unlink(missing_ok=True)
    if done.returncode != 0:
        raise SlmopsError(f"could not draw the report's plots: {(done.stderr.strip().splitlines() or ['?'])[-1]}")


def draw(data: dict[str, Any], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bench, compare = data.get("bench"), data.get("compare")
    if bench and bench.get("sweep"):
        sweep = bench["sweep"]
        x = [s["prompt_tokens"] for s in sweep]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        a1.plot(x, [s["latency_ms_p50"] for s in sweep], "o-", label="latency p50")
        a1.plot(x, [s["latency_ms_p95"] for s in sweep], "s--", label="latency p95")
        a1.plot(x, [s["ttft_ms_p50"] for s in sweep], "^-", label="TTFT p50")
        a1.set(xlabel="prompt tokens", ylabel="ms", title="Latency vs input length")
        a1.legend()
        a2.plot(x, [s["decode_tok_s"] for s in sweep], "o-", label="decode")
        a2.plot(x, [s["prefill_tok_s"] for s in sweep], "s-", label="prefill")
        a2.set(xlabel="prompt tokens", ylabel="tokens/s", title="Throughput vs input length", yscale="log")
        a2.legend()
        fig.tight_layout()
        fig.savefig(folder / "speed.png", dpi=100)
        plt.close(fig)
    if compare:
        rows = compare["rows"]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([r["size_mb"] for r in rows], [r["mean_kld"] for r in rows])
        for r in rows:
            ax.annotate(r["build"], (r["size_mb"], r["mean_kld"]))
        ax.set(xlabel="size on disk (MB)", ylabel="mean KLD vs fp32", title="Quality vs size")
        fig.tight_layout()
        fig.savefig(folder / "quality.png", dpi=100)
        plt.close(fig)


if __name__ == "__main__":
    draw(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
