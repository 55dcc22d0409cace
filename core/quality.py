"""Quality against a reference: teacher-forced next-token distributions (mean KL divergence, top-1 agreement,
perplexity) on a text set shipped with slmops, and a user's own domain set."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SlmopsError


def load_set(path: Path | None = None) -> list[dict[str, str]]:
    """A JSONL set: {"text": ...} rows (scored by perplexity) and {"prompt", "expected"} rows (answer check)."""
    try:
        raw = Path(path).read_text(encoding="utf-8") if path else resources.files("slmops").joinpath("data/quality.jsonl").read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SlmopsError(f"cannot read the quality set {path}: {e}") from None
    rows = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise SlmopsError(f"{path}:{number}: not valid JSON ({e}); each line must be one JSON object") from None
        if not isinstance(row, dict) or not ("text" in row or ("prompt" in row and "expected" in row)):
            raise SlmopsError(f"{path}:{number}: each line needs \"text\", or \"prompt\" and \"expected\"")
        rows.append(row)
    if not rows:
        raise SlmopsError(f"the quality set {path} is empty")
    return rows


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def compare(candidate: Path, reference: Path, rows: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """Mean KL(reference || candidate), top-1 agreement, and both perplexities over the text rows."""
    rows = [r for r in (rows or load_set()) if "text" in r]
    # Always two runs, also for one folder: a comparison that short-cuts equal paths proves nothing.
    from .runtime import Session

    ref, cand = Session(reference), Session(candidate)
    kld, agree, nll_ref, nll_cand, positions = 0.0, 0, 0.0, 0.0, 0
    for row in rows:
        tokens = ref.encode(row["text"])
        if len(tokens) < 2:
            continue
        lr = _log_softmax(ref.logits(tokens))[:-1]
        lc = _log_softmax(cand.logits(tokens))[:-1]
        target = np.array(tokens[1:])
        kld += float((np.exp(lr) * (lr - lc)).sum())
        agree += int((lr.argmax(-1) == lc.argmax(-1)).sum())
        nll_ref -= float(lr[np.arange(len(target)), target].sum())
        nll_cand -= float(lc[np.arange(len(target)), target].sum())
        positions += len(target)
    if positions == 0:
        raise SlmopsError("the quality set has no text long enough to score")
    return {"positions": positions, "mean_kld": kld / positions, "top1_agreement": agree / positions,
            "perplexity": float(np.exp(nll_cand / positions)), "reference_perplexity": float(np.exp(nll_ref / positions))}


def domain_score(chat, rows: list[dict[str, str]], max_new_tokens: int = 64) -> dict[str, Any]:
    """Share of {"prompt","expected"} rows whose greedy answer contains the expected text (case-insensitive)."""
    graded = [r for r in rows if "prompt" in r]
    hits, results = 0, []
    for r in graded:
        usage: dict[str, Any] = {}
        answer = "".join(chat.stream([{"role": "user", "content": r["prompt"]}], {"max_new_tokens": max_new_tokens, "temperature": 0}, usage))
        ok = r["expected"].lower() in answer.lower()
        hits += ok
        results.append({"prompt": r["prompt"], "expected": r["expected"], "answer": answer, "ok": ok})
    return {"rows": len(graded), "accuracy": hits / len(graded) if graded else None, "results": results}
