"""Quality against a reference: teacher-forced next-token distributions (mean and p99 KL divergence, top-1
agreement, perplexity, mean change in the probability of the right token) on the corpus shipped with slmops
(data/corpus.jsonl: about 24k tokens of prose, code and dialogue), and a user's own domain set.

Texts are cut into windows of CHUNK tokens and the second half of each window is scored, with the first half as
context, as llama.cpp's perplexity tool does: every scored position sees at least CHUNK/2 tokens before it."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from slmops import progress
from slmops.errors import SlmopsError
from slmops.host.reading import read_text_limited
from slmops.results import Quality

CHUNK = 512
WINDOWING = 2  # 2: every window opens with the tokenizer's BOS; results remembered under 1 are not reused
CORPUS = "data/corpus.jsonl"
SET_ENV = "SLMOPS_QUALITY_SET"  # a JSONL file of {"text"} rows to score instead of the shipped corpus


def corpus_id(rows: list[dict[str, str]] | None = None, prefix: list[int] | None = None) -> str:
    """Names the scored text and how it is cut, so remembered results are not reused for other text."""
    blob = json.dumps([CHUNK, WINDOWING, prefix or [], [r.get("text") for r in (rows or load_set())]])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_set(path: Path | None = None, shipped: bool = False) -> list[dict[str, str]]:
    """A JSONL set: {"text": ...} rows (scored by perplexity) and {"prompt", "expected"} rows (answer check).
    Without a path: $SLMOPS_QUALITY_SET if set, else (and always with shipped) the shipped corpus."""
    path = None if shipped else (path or os.environ.get(SET_ENV) or None)
    if path:
        raw = read_text_limited(Path(path), "JSONL set")  # a regular file of at most 64 MB, or one line why not
    else:
        raw = resources.files("slmops").joinpath(CORPUS).read_text()
    rows = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise SlmopsError(f"{path}:{number}: not valid JSON ({e}); each line must be one JSON object") from None
        if not isinstance(row, dict) or not ("text" in row or ("prompt" in row and "expected" in row)):
            raise SlmopsError(f'{path}:{number}: each line needs "text", or "prompt" and "expected"')
        rows.append(row)
    if not rows:
        raise SlmopsError(f"the quality set {path} is empty")
    return rows


MIN_CALIBRATION_CHARS = 2000  # about 500 tokens: less says too little about what flows into each MatMul


def calibration_text(path: Path) -> str:
    """A user's calibration file (the JSONL of load_set: "text" rows, or "prompt" and "expected") as one text, each
    row a paragraph; too little text is refused with a one-line error."""
    rows = load_set(Path(path))
    text = "\n\n".join(
        str(r["text"]) if "text" in r else f"{r['prompt']}\n{answer_text(r['expected'])}"
        for r in rows
        if isinstance(r.get("text", r.get("prompt")), str)
    )
    if len(text) < MIN_CALIBRATION_CHARS:
        raise SlmopsError(
            f"the calibration file {path} has {len(text)} characters of text; give at least {MIN_CALIBRATION_CHARS} "
            "(a few pages of what the model will see)"
        )
    return text


def answer_text(expected: Any) -> str:
    """A row's expected answer as the model writes it: a structured one (a record, a call) as JSON."""
    return expected if isinstance(expected, str) else json.dumps(expected)


def log_softmax(x: np.ndarray) -> np.ndarray:
    # float32 is enough: the sums below are per position over one vocabulary, and the totals are kept in float64
    x = np.asarray(x, dtype=np.float32)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """KL(reference || candidate) per position, from their log-probabilities (log_softmax), summed in float64."""
    return (np.exp(reference) * (reference - candidate)).sum(axis=-1, dtype=np.float64)


def windows(tokens: list[int], chunk: int = CHUNK, prefix: list[int] | None = None) -> list[list[int]]:
    """The text's tokens cut into windows of chunk tokens (the last may be shorter), each opened by the tokenizer's
    prefix (its BOS: a window is a text of its own, as in llama.cpp's perplexity); windows under 2 tokens dropped."""
    prefix = prefix or []
    step = chunk - len(prefix)
    cut = (prefix + tokens[i : i + step] for i in range(0, len(tokens), step))
    return [w for w in cut if len(w) - len(prefix) >= 2]


Logits = Callable[[list[int]], np.ndarray]  # tokens -> next-token logits at every position, [len, vocab]


def compare(candidate: Path, reference: Path, rows: list[dict[str, str]] | None = None, chunk: int = CHUNK) -> Quality:
    """KL(reference || candidate) per scored position (mean and p99), top-1 agreement, both perplexities and the
    mean change in the right token's probability (candidate minus reference), over the text rows."""
    # Always two runs, also for one folder: a comparison that short-cuts equal paths proves nothing.
    from slmops.run.runtime import Session

    ref, cand = Session(reference), Session(candidate)
    chunk = min(chunk, ref.context_length - 1, cand.context_length - 1)  # logits need one more token of room
    return score(ref.logits, {"candidate": cand.logits}, ref.tokens, rows, chunk, ref.prefix)["candidate"]


def score(
    reference: Logits,
    candidates: dict[str, Logits],
    encode: Callable[[str], list[int]],
    rows: list[dict[str, str]] | None = None,
    chunk: int = CHUNK,
    prefix: list[int] | None = None,
) -> dict[str, Quality]:
    """compare() for several candidates in one pass over the text: the reference runs once per window. encode:
    a text's own tokens; prefix: what the tokenizer puts before a text (BOS), opening every window."""
    rows = [r for r in (rows or load_set()) if "text" in r]
    sums = {name: {"kld": [], "agree": 0, "nll": 0.0, "delta_p": 0.0} for name in candidates}
    nll_ref, positions = 0.0, 0
    every = [window for row in rows for window in windows(encode(row["text"]), chunk, prefix)]
    for done, window in enumerate(every):
        progress.count(done, len(every), "windows scored")
        first = len(window) // 2  # predictions from here on are scored; the tokens before are context
        lr = log_softmax(reference(window)[first:-1])
        target = np.array(window[first + 1 :])
        at = np.arange(len(target))
        nll_ref -= float(lr[at, target].sum())
        positions += len(target)
        for name, logits in candidates.items():
            lc, s = log_softmax(logits(window)[first:-1]), sums[name]
            s["kld"].append(kl(lr, lc))
            s["agree"] += int((lr.argmax(-1) == lc.argmax(-1)).sum())
            s["nll"] -= float(lc[at, target].sum())
            s["delta_p"] += float((np.exp(lc[at, target]) - np.exp(lr[at, target])).sum())
    if not positions:
        raise SlmopsError("the quality set has no text long enough to score")
    results = {}
    for name, s in sums.items():
        kld = np.concatenate(s["kld"])
        results[name] = Quality(
            positions=positions,
            mean_kld=float(kld.mean()),
            kld_p99=float(np.percentile(kld, 99)),
            top1_agreement=s["agree"] / positions,
            perplexity=float(np.exp(s["nll"] / positions)),
            reference_perplexity=float(np.exp(nll_ref / positions)),
            mean_delta_p=s["delta_p"] / positions,
            window=chunk,
            corpus=corpus_id(rows, prefix),
        )
    return results
