"""`slmops validate` and deploy's gate: the guide's quality checklist as pass/fail rows over a model folder."""

from __future__ import annotations

from pathlib import Path

from . import progress
from .bench import measure, quality_of, reference_for
from .chat import OrtGenAIChat
from .config import Config
from .edgecases import run_suite
from .results import Check, Quality, Validation

SPEED_SPREAD = 2.5  # decode tok/s may differ at most this much (max/min) across the prompt lengths
DOMAIN_ACCURACY = 0.5


def validate(
    model_dir: Path,
    cfg: Config,
    reference: str | None = None,
    domain: Path | None = None,
    measured_quality: Quality | None = None,
    benchmarker: str | None = None,
) -> Validation:
    """Quality against the fp32 reference (or quality already measured against it), response format, a memory
    soak, speed across input lengths and the edge cases, each a Check."""
    v, b = cfg.section("validate"), cfg.section("bench")
    q = measured_quality or quality_of(model_dir, reference_for(model_dir, reference), domain)
    checks = [
        Check("quality: mean KLD", q.mean_kld <= v["max_kld"], round(q.mean_kld, 4), f"<= {v['max_kld']}"),
        Check(
            "quality: top-1 agreement",
            q.top1_agreement >= v["min_top1"],
            round(q.top1_agreement, 4),
            f">= {v['min_top1']}",
        ),
    ]
    if q.domain and q.domain["accuracy"] is not None:
        checks.append(
            Check(
                "domain set accuracy",
                q.domain["accuracy"] >= DOMAIN_ACCURACY,
                q.domain["accuracy"],
                f">= {DOMAIN_ACCURACY}",
            )
        )
    chat = OrtGenAIChat(model_dir)
    with progress.step("Checking the response format"):
        answer = "".join(
            chat.stream(
                [{"role": "user", "content": "What is the capital of France?"}],
                {"max_new_tokens": 24, "temperature": 0},
                {},
            )
        )
    leaked = [t for t in chat.chosen.family.markers if t in answer]
    checks.append(
        Check(
            "response format",
            bool(answer.strip()) and not leaked,
            repr(answer[:60]),
            "non-empty, no template tokens",
        )
    )
    m = measure(model_dir, {**b, "soak_requests": v["soak_requests"], "runs": max(2, b["runs"])}, benchmarker)
    growth = m.metric("rss_growth_mb")
    checks.append(
        Check(
            "no memory leak over the soak",
            growth is not None and growth <= v["max_leak_mb"],
            f"{growth:.1f} MB over {m.settings.get('soak_requests', v['soak_requests'])} requests"
            if growth is not None
            else f"not measured by {m.benchmarker}",
            f"<= {v['max_leak_mb']} MB",
        )
    )
    speeds = [s["decode_tok_s"] for s in m.sweep] or [m.decode_tok_s]
    spread = max(speeds) / min(speeds) if min(speeds) > 0 else float("inf")
    checks.append(
        Check(
            "consistent speed across input lengths",
            spread <= SPEED_SPREAD,
            f"decode tok/s {', '.join(f'{s:.0f}' for s in speeds)} (max/min {spread:.2f})",
            f"max/min <= {SPEED_SPREAD}",
        )
    )
    edges = run_suite(chat)
    failed = [e["case"] for e in edges if not e["ok"]]
    checks.append(
        Check(
            "edge cases handled",
            not failed,
            f"{len(edges) - len(failed)}/{len(edges)} pass" + (f"; failed: {', '.join(failed)}" if failed else ""),
            "all",
        )
    )
    return Validation(checks, q, m, edges)
