"""Convert the default model to int4: slmops vs plain `olive auto-opt` (the guide's Method 1) vs the model
builder's own CLI, side by side in one run; slmops twice: `--algorithm rtn` (the same rounding as the other two)
and its default for this float checkpoint (gptq); then slmops's cache hit. Targets, for the like-for-like rtn row:
slmops <= 0.6x Olive's wall time, peak RSS no higher than the model builder's own; a cache hit under 1 s. A tool that fails is reported as such in its
row (with the end of its error) and the rest goes on: on the pinned stack plain `olive auto-opt` fails with
"No module named 'onnxruntime_genai.models.quantized_model'", and its ratio then says n/a."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import run_measured  # noqa: E402

BIN = Path(sys.executable).parent


def main() -> None:
    from slmops.build import sources

    checkpoint = str(sources.resolve("default").checkpoint)  # the GGUF -> checkpoint step is shared, done once
    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    env = {**os.environ, "SLMOPS_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1"}
    Path(env["SLMOPS_HOME"]).mkdir()

    def fresh(name: str) -> str:  # each tool starts cold: Olive keeps a run cache (.olive-cache) in its cwd
        folder = work / f"cwd-{name}"
        folder.mkdir()
        return str(folder)

    def measured(cmd: list[str], cwd: str) -> dict:
        try:
            return run_measured(cmd, env, cwd)
        except RuntimeError as e:  # an anchor that cannot run is a result too
            return {"error": " ".join(str(e).split())[-160:]}

    rows = {
        # Like for like with Olive and the builder (round to nearest), then slmops's default for a float source (gptq:
        # error-compensating rounding, measured Hessians, a verify against torch), which costs minutes, not seconds.
        "slmops convert rtn": measured(
            [str(BIN / "slmops"), "-q", "convert", checkpoint, "--precision", "int4", "--algorithm", "rtn"],
            fresh("slmops-rtn"),
        ),
        "slmops convert": measured(
            [str(BIN / "slmops"), "-q", "convert", checkpoint, "--precision", "int4"], fresh("slmops")
        ),
        "olive auto-opt": measured(
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
            fresh("olive"),
        ),
        "model builder CLI": measured(
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
            fresh("builder"),
        ),
        "slmops cache hit": measured(
            [str(BIN / "slmops"), "-q", "convert", checkpoint, "--precision", "int4"], fresh("hit")
        ),
    }

    def ratio(a: dict, b: dict, key: str) -> str:
        return f"{a[key] / b[key]:.2f}" if key in a and key in b else "n/a"

    olive, builder = rows["olive auto-opt"], rows["model builder CLI"]
    print(f"{'tool':<20} {'wall s':>8} {'peak RSS MB':>12} {'wall / olive':>13} {'wall / builder':>15}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<20} failed: {r['error']}")
            continue
        walls = f"{ratio(r, olive, 'wall_s'):>13} {ratio(r, builder, 'wall_s'):>15}"
        print(f"{name:<20} {r['wall_s']:>8.1f} {r['peak_rss_mb']:>12.0f} {walls}")
    ours, hit = rows["slmops convert rtn"], rows["slmops cache hit"]
    print(f"\nslmops (rtn) / olive wall time: {ratio(ours, olive, 'wall_s')} (target <= 0.6)")
    print(f"cache hit: {hit.get('wall_s', float('nan')):.2f} s (target < 1 s)")
    print(f"slmops (rtn) / model builder peak RSS: {ratio(ours, builder, 'peak_rss_mb')} (target <= 1.0)")


if __name__ == "__main__":
    main()
