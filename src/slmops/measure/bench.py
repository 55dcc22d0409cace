"""`slmops bench`: measure a model folder (speed, memory, CPU through a benchmarker plugin; quality against its fp32
reference; the edge cases), and compare the precisions of one source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmops import progress
from slmops.build import candidates, store
from slmops.build import convert as conv
from slmops.config import Config
from slmops.errors import NoImplementation, SlmopsError
from slmops.host.fsutil import dir_size
from slmops.measure import domain as domain_set
from slmops.measure import quality
from slmops.measure.edgecases import run_suite
from slmops.plugin import provided
from slmops.plugin.roles import BENCH_RESULT_KEYS
from slmops.results import BENCH_SETTINGS, BenchResult, Build, Quality
from slmops.run.chat import OrtGenAIChat

# One candidate of `bench --compare`: its label, build, speed and quality against the fp32 build.
Measured = tuple[str, Build, BenchResult, Quality]

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


def resolve_target(cfg: Config, target: str) -> Path:
    """A model folder, or the folder of a registered name."""
    path = Path(target).expanduser()
    if path.is_dir():
        if not (path / "genai_config.json").is_file():
            raise SlmopsError(f"{target} is not an ORT GenAI model folder (no genai_config.json)")
        return path
    from slmops.registry import find_runnable, open_registry

    return Path(find_runnable(open_registry(cfg), target).path)


def benchmarker_for(model_dir: Path, name: str | None = None):
    items = provided.benchmarkers()
    if name:
        return provided.by_name(items, name, "benchmarker")
    reasons = []
    for b in items:
        why = b.check(model_dir)
        if why is None:
            return b
        reasons.append(f"{b.name}: {why}")
    raise SlmopsError(f"no benchmarker can measure {model_dir}: " + "; ".join(reasons))


def measure(model_dir: Path, settings: dict[str, Any], benchmarker: str | None = None) -> BenchResult:
    """The chosen benchmarker's result, held to the contract: BENCH_RESULT_KEYS present and numbers."""
    bench = benchmarker_for(model_dir, benchmarker)
    with progress.step(f"Benchmarking with {bench.name}"):
        raw = bench.run(model_dir, settings, lambda text: None)
    if not isinstance(raw, dict):
        raise SlmopsError(f"benchmarker {bench.name!r} returned {type(raw).__name__}, not a dict of results")
    missing = [k for k in BENCH_RESULT_KEYS if not isinstance(raw.get(k), (int, float))]
    if missing:
        raise SlmopsError(
            f"benchmarker {bench.name!r} returned no number for {', '.join(missing)}; "
            f"every benchmarker must return {', '.join(BENCH_RESULT_KEYS)} (docs/plugins.md)"
        )
    return BenchResult.from_json({"benchmarker": bench.name, **raw, "size_bytes": dir_size(model_dir)})


def extra_metrics(result: BenchResult) -> dict[str, float]:
    """The numbers a benchmarker returned beyond the summary's: shown in the table and the report as they are."""
    return {k: v for k, v in result.metrics.items() if k not in SUMMARY_KEYS and k not in BENCH_SETTINGS}


def reference_for(model_dir: Path, reference: str | None = None) -> Path:
    """The fp32 reference of a model folder: --reference, else the fp32 build of the source its manifest names."""
    if reference:
        return Path(reference)
    manifest = store.read_manifest(model_dir)
    if not manifest:
        raise SlmopsError(
            f"{model_dir} has no slmops manifest, so its source is unknown; pass --reference with an fp32 model folder"
        )
    if manifest["options"].get("precision") == "fp32":
        return model_dir
    source = manifest["source"]["path"] if manifest["source"]["kind"] != "default" else None
    return conv.reference(source, manifest["options"]).path


def quality_of(model_dir: Path, reference: Path, domain: Path | None = None) -> Quality:
    with progress.step("Measuring quality against the fp32 reference"):
        result = quality.compare(model_dir, reference)
    if domain:
        result.domain = domain_scores(model_dir, reference, domain)
    return result


def domain_scores(
    model_dir: Path, reference: Path, domain: Path, source: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The domain set scored on the build, with the source's shares (its fp32 build, same rows) under "source"
    (source: those shares already scored, as deploy's candidates share one reference)."""
    rows = quality.load_set(domain)
    with progress.step(f"Scoring the domain set {domain.name}"):
        scored = domain_set.score(OrtGenAIChat(model_dir), rows)
    if source is None:
        with progress.step(f"Scoring the domain set {domain.name} on the source, for comparison"):
            source = {k: v for k, v in domain_set.score(OrtGenAIChat(reference), rows).items() if k != "results"}
    scored["source"] = source
    return scored


def edge_cases(model_dir: Path) -> list[dict[str, Any]]:
    with progress.step("Running the edge-case suite"):
        return run_suite(OrtGenAIChat(model_dir))


def bench(
    model_dir: Path,
    settings: dict[str, Any],
    benchmarker: str | None = None,
    with_quality: bool = True,
    reference: str | None = None,
    domain: Path | None = None,
    with_edge_cases: bool = True,
) -> dict[str, Any]:
    """`slmops bench TARGET`: the benchmark, quality against the reference (or why it was skipped), edge cases."""
    result: dict[str, Any] = {"model": str(model_dir), "bench": measure(model_dir, settings, benchmarker)}
    if with_quality:
        try:
            result["quality"] = quality_of(model_dir, reference_for(model_dir, reference), domain)
        except SlmopsError as e:  # no manifest and no --reference: the speed is still worth showing
            result["quality_skipped"] = str(e)
    if with_edge_cases:
        result["edge_cases"] = edge_cases(model_dir)
    return result


def bench_json(result: dict[str, Any]) -> dict[str, Any]:
    """bench()'s result as `--json` prints it: the benchmark's numbers at the top, as before."""
    data = {"model": result["model"], **result["bench"].to_json()}
    if "quality" in result:
        data["quality"] = result["quality"].to_json()
    elif "quality_skipped" in result:
        data["quality"] = {"skipped": result["quality_skipped"]}
    if "edge_cases" in result:
        data["edge_cases"] = result["edge_cases"]
    return data


def compare_precisions(
    source: str | None, base_options: dict[str, Any], settings: dict[str, Any], thresholds: dict[str, float]
) -> dict[str, Any]:
    """Build the fp32, int8 and int4 candidates (cached), measure each, and recommend the smallest that passes."""
    return recommend(*measure_precisions(source, base_options, settings), thresholds)


def measure_precisions(
    source: str | None, base_options: dict[str, Any], settings: dict[str, Any]
) -> tuple[list[Measured], list[dict[str, str]]]:
    """Each candidate's (label, build, speed, quality against the fp32 build), fp32 first; and the candidates no
    plugin can build for this source, with why."""
    builds, skipped = {}, []
    for label, opts in reversed(candidates.CANDIDATES):
        try:
            builds[label] = (
                conv.reference(source, base_options)
                if opts["precision"] == "fp32"
                else conv.convert(source, candidates.candidate_options(base_options, opts))
            )
        except NoImplementation as e:  # e.g. int4 gguf for a checkpoint source
            skipped.append({"build": label, "why": str(e)})
    reference = builds["fp32"].path
    measured = [
        (label, build, measure(build.path, {**settings, "soak_requests": 0}), quality.compare(build.path, reference))
        for label, build in builds.items()
    ]
    return measured, skipped


def recommend(measured: list[Measured], skipped: list[dict[str, str]], thresholds: dict[str, float]) -> dict[str, Any]:
    """`bench --compare`'s rows and its recommendation under a gate: the smallest build that passes, else fp32."""
    rows = [
        {
            "build": label,
            "path": str(build.path),
            "size_mb": build.output_bytes / 1e6,
            "decode_tok_s": speed.decode_tok_s,
            "ttft_ms": speed.ttft_ms_p50,
            **q.to_json(),
            "passes": q.passes(thresholds["max_kld"], thresholds["min_top1"]),
        }
        for label, build, speed, q in measured
    ]
    base = rows[0]
    for r in rows:
        r["size_ratio"] = r["size_mb"] / base["size_mb"]
        r["speed_ratio"] = r["decode_tok_s"] / base["decode_tok_s"]
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
