"""Convert the default model to int4: slmops vs plain `olive auto-opt` (the guide's Method 1) vs the model
builder's own CLI, side by side in one run; then slmops's cache hit. Targets: slmops <= 0.6x Olive's wall time,
a cache hit under 1 s, peak RSS no higher than the model builder's own."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import run_measured  # noqa: E402

BIN = Path(sys.executable).parent


def main() -> None:
    from slmops import sources

    checkpoint = str(sources.resolve("default").checkpoint)  # the GGUF -> checkpoint step is shared, done once
    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    env = {**os.environ, "SLMOPS_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1"}
    Path(env["SLMOPS_HOME"]).mkdir()

    def fresh(name: str) -> str:  # each tool starts cold: Olive keeps a run cache (.olive-cache) in its cwd
        folder = work / f"cwd-{name}"
        folder.mkdir()
        return str(folder)

    rows = {
        "slmops convert": run_measured(
            [str(BIN / "slmops"), "-q", "convert", checkpoint, "--precision", "int4"], env, fresh("slmops")
        ),
        "olive auto-opt": run_measured(
            [
                str(BIN / "olive"),
                "auto-opt",
                "--model_name_or_path",
                checkpoint,
                "--device",
                "cpu",
                "--provider",
                "CPUExecutionProvider",
                "--use_model_builder",
                "--precision",
                "int4",
                "--output_path",
                str(work / "olive"),
                "--log_level",
                "3",
            ],
            env,
            fresh("olive"),
        ),
        "model builder CLI": run_measured(
            [
                sys.executable,
                "-m",
                "onnxruntime_genai.models.builder",
                "-i",
                checkpoint,
                "-o",
                str(work / "builder"),
                "-p",
                "int4",
                "-e",
                "cpu",
                "-c",
                str(work / "bcache"),
            ],
            env,
            fresh("builder"),
        ),
        "slmops cache hit": run_measured(
            [str(BIN / "slmops"), "-q", "convert", checkpoint, "--precision", "int4"], env, fresh("hit")
        ),
    }
    olive = rows["olive auto-opt"]
    print(f"{'tool':<20} {'wall s':>8} {'peak RSS MB':>12} {'wall / olive':>13}")
    for name, r in rows.items():
        print(f"{name:<20} {r['wall_s']:>8.1f} {r['peak_rss_mb']:>12.0f} {r['wall_s'] / olive['wall_s']:>13.2f}")
    s, b = rows["slmops convert"], rows["model builder CLI"]
    print(f"\nslmops / olive wall time: {s['wall_s'] / olive['wall_s']:.2f} (target <= 0.6)")
    print(f"cache hit: {rows['slmops cache hit']['wall_s']:.2f} s (target < 1 s)")
    print(f"slmops / model builder peak RSS: {s['peak_rss_mb'] / b['peak_rss_mb']:.2f} (target <= 1.0)")


if __name__ == "__main__":
    main()
