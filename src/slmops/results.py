"""What the steps of the pipeline hand each other: a build, its quality, a benchmark, a validation, a deployment.
Each is a dataclass with to_json() for `--json`, the deploy record and the memo files; from_json() reads back the
ones slmops keeps on disk."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The settings a benchmarker echoes back with its numbers: not metrics of the model.
BENCH_SETTINGS = ("soak_requests", "max_new_tokens", "runs", "lengths")


@dataclass
class Build:
    """A verified ORT GenAI model folder, from the cache or just built, and its slmops-manifest.json."""

    path: Path
    cached: bool
    manifest: dict[str, Any]

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def options(self) -> dict[str, Any]:
        return self.manifest["options"]

    @property
    def precision(self) -> str:
        return self.options["precision"]

    @property
    def output_bytes(self) -> int:
        return self.manifest["output_bytes"]

    @property
    def verification(self) -> dict[str, Any]:
        return self.manifest["verification"]

    def to_json(self) -> dict[str, Any]:
        return {**self.manifest, "path": str(self.path), "cached": self.cached}


@dataclass
class Quality:
    """A model's next-token distributions against a reference's on the same text (quality.score)."""

    positions: int
    mean_kld: float  # KL(reference || candidate), mean over the scored positions
    kld_p99: float
    top1_agreement: float  # share of positions where both put the same token first
    perplexity: float
    reference_perplexity: float
    mean_delta_p: float  # mean change in the right token's probability, candidate minus reference
    window: int  # tokens per window; the second half of each is scored
    corpus: str  # quality.corpus_id of the scored text
    domain: dict[str, Any] | None = None  # a user's {"prompt", "expected"} set, when one was scored

    def passes(self, max_kld: float, min_top1: float) -> bool:
        """The quality gate: deploy, `bench --compare` and validate all judge a build by this."""
        # a NaN (None once written as JSON) never passes
        if self.mean_kld is None or self.top1_agreement is None or not math.isfinite(self.mean_kld):
            return False
        return self.mean_kld <= max_kld and self.top1_agreement >= min_top1

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.domain is None:
            del data["domain"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Quality:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


@dataclass
class BenchResult:
    """A benchmarker's measurement of a model folder, held to the contract (decode_tok_s and ttft_ms_p50)."""

    benchmarker: str
    decode_tok_s: float
    ttft_ms_p50: float
    size_bytes: int
    metrics: dict[str, float] = field(default_factory=dict)  # every other number it returned: load_s, peak_rss_mb, ...
    sweep: list[dict[str, Any]] = field(default_factory=list)  # one row per prompt length, where it measured those
    settings: dict[str, Any] = field(default_factory=dict)  # what it echoed of the run's settings (soak_requests, ...)
    labels: dict[str, str] = field(default_factory=dict)  # words it returned, e.g. peak_rss_scope

    def metric(self, name: str) -> float | None:
        """A number the benchmarker may or may not measure (a third party's need not measure memory)."""
        return self.metrics.get(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmarker": self.benchmarker,
            "decode_tok_s": self.decode_tok_s,
            "ttft_ms_p50": self.ttft_ms_p50,
            **self.metrics,
            **self.settings,
            **self.labels,
            "sweep": self.sweep,
            "size_bytes": self.size_bytes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchResult:
        fixed = {"benchmarker", "decode_tok_s", "ttft_ms_p50", "size_bytes", "sweep"}
        numbers = {
            k: v for k, v in data.items() if k not in fixed and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        return cls(
            benchmarker=str(data.get("benchmarker", "?")),
            decode_tok_s=float(data["decode_tok_s"]),
            ttft_ms_p50=float(data["ttft_ms_p50"]),
            size_bytes=int(data.get("size_bytes", 0)),
            metrics={k: v for k, v in numbers.items() if k not in BENCH_SETTINGS},
            sweep=list(data.get("sweep") or []),
            settings={k: data[k] for k in BENCH_SETTINGS if k in data},
            labels={k: v for k, v in data.items() if k not in fixed and isinstance(v, str)},
        )


@dataclass
class Check:
    """One row of the guide's checklist."""

    check: str
    ok: bool
    value: Any
    limit: str


@dataclass
class Validation:
    """The checklist a model folder went through (gate.validate), with the measurements behind it."""

    checks: list[Check]
    quality: Quality
    bench: BenchResult
    edge_cases: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checks": [dataclasses.asdict(c) for c in self.checks],
            "quality": self.quality.to_json(),
            "bench": self.bench.to_json(),
            "edge_cases": self.edge_cases,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Validation:
        return cls(
            checks=[Check(**c) for c in data["checks"]],
            quality=Quality.from_json(data["quality"]),
            bench=BenchResult.from_json(data["bench"]),
            edge_cases=list(data.get("edge_cases") or []),
        )


@dataclass
class Deployment:
    """What `slmops deploy` did: the build chosen, what was tried, the validation it passed, how to use it."""

    name: str
    build: Build
    registry: str
    tried: list[dict[str, Any]]
    validation: Validation
    run: str  # the command that chats with it
    serve: str  # the command that serves it
    skipped: bool = False  # already deployed from this build: nothing was validated or registered again
    answer: dict[str, Any] | None = None  # the answer to --ask

    def to_json(self) -> dict[str, Any]:
        data = {
            "name": self.name,
            "build": str(self.build.path),
            "registry": self.registry,
            "tried": self.tried,
            "skipped": self.skipped,
            "validation": self.validation.to_json(),
            "run": self.run,
            "serve": self.serve,
        }
        if self.answer is not None:
            data["answer"] = self.answer
        return data
