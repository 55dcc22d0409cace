"""The float sources that slmops's int4 for float checkpoints is measured on (issue 28): no float SmolLM2 can be
downloaded here, so both are made from the embedded one, seeded, and cached under $SLMOPS_HOME/bench.

- dithered: its GGUF weights (4-bit blocks; the embedding 8-bit) with each block's rounding undone by uniform noise of
  one quantization step (value + U(-step/2, step/2)). What a float model looks like to a quantizer (weights off any
  grid, the same per-block ranges) while staying a working model.
- finetuned: what users really bring. The dequantized SmolLM2 fully fine-tuned on the order-record task of
  benchmarks/make_domain.py (AdamW, loss on the answer tokens only), a few minutes on 2 cores. Its held-out rows
  (benchmarks/data/orders-eval.jsonl) measure the domain accuracy a build keeps.

Tests make tiny variants with the same code (a random-weight model from a config, a few steps).

    python benchmarks/float_sources.py      # makes both at full size, prints the fine-tune's loss and time
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import make_domain  # noqa: E402

SEED = 0
STEPS, BATCH, LEARNING_RATE = 60, 8, 1e-4  # full size: ~0.3 epoch of 400 rows reaches the task (see main's print)


def dithered(checkpoint: Path, out: Path) -> Path:
    """The dithered float stand-in of checkpoint, written once to out."""
    from safetensors.numpy import load_file, save_file

    if (out / "model.safetensors").is_file():
        return out
    tmp = staging(out)
    rng = np.random.default_rng(SEED)
    tensors = load_file(str(checkpoint / "model.safetensors"))
    for name, value in tensors.items():
        if value.ndim != 2 or value.shape[1] % 32:
            continue
        x = value.astype(np.float64).reshape(value.shape[0], -1, 32)
        lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
        step4 = (hi - lo) / 15
        codes = (x - lo) / np.where(step4 > 0, step4, 1)
        on_4bit_grid = np.abs(codes - np.rint(codes)).max(-1, keepdims=True) < 1e-3  # Q4_1; else Q8_0
        step = np.where(on_4bit_grid, step4, np.abs(x).max(-1, keepdims=True) / 127)
        tensors[name] = (x + (rng.random(x.shape) - 0.5) * step).reshape(value.shape).astype(np.float32)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    copy_rest(checkpoint, tmp, skip={"model.safetensors"})
    tmp.rename(out)
    return out


def staging(out: Path) -> Path:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def copy_rest(checkpoint: Path, to: Path, skip: set[str]) -> None:
    for f in checkpoint.iterdir():
        if f.is_file() and f.name not in skip and not f.name.startswith("."):  # not slmops's own records
            shutil.copy(f, to / f.name)


def encode(tokenizer, row: dict) -> tuple[list[int], int]:
    """The row as the model's own chat template writes it, and where its answer starts (the loss is taken there).
    The answer is the row's expected record as JSON, as a calibration file's rows are read (quality.answer_text)."""
    from slmops.measure.quality import answer_text

    asked = [{"role": "user", "content": row["prompt"]}]

    def tokens(messages: list[dict], **options) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **options)
        return tokenizer(text, add_special_tokens=False).input_ids  # the template writes its own special tokens

    prompt = tokens(asked, add_generation_prompt=True)
    whole = tokens(asked + [{"role": "assistant", "content": answer_text(row["expected"])}])
    if list(whole[: len(prompt)]) != list(prompt):
        raise ValueError("the chat template writes the prompt differently with an answer after it")
    return list(whole), len(prompt)


def finetune(
    checkpoint: Path,
    out: Path,
    rows: list[dict],
    steps: int = STEPS,
    batch: int = BATCH,
    learning_rate: float = LEARNING_RATE,
    progress: Callable[[str], None] = lambda _: None,
) -> dict:
    """Fully fine-tune checkpoint on rows (make_domain's {"prompt", "expected"}), write it to out (float32
    safetensors, the checkpoint's tokenizer and config) and return {"losses": [per step], "seconds": wall}.
    Seeded; the rows are taken in a fixed shuffled order."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmops.host.cpus import allowed_cpus

    torch.manual_seed(SEED)
    torch.set_num_threads(allowed_cpus())
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    model.train()
    encoded = [encode(tokenizer, r) for r in rows]
    order = np.random.default_rng(SEED).permutation(len(encoded))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5) * (1 - s / steps))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses, start = [], time.perf_counter()
    for step in range(steps):
        picked = [encoded[order[(step * batch + i) % len(order)]] for i in range(batch)]
        width = max(len(t) for t, _ in picked)
        ids = torch.full((batch, width), pad, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        for i, (tokens, answer_at) in enumerate(picked):
            ids[i, : len(tokens)] = torch.tensor(tokens)
            mask[i, : len(tokens)] = 1
            labels[i, answer_at : len(tokens)] = torch.tensor(tokens[answer_at:])
        # The output layer only where a token is trained: the vocabulary's logits are most of a small model's cost.
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        targets = labels[:, 1:]
        taken = targets != -100
        logits = model.lm_head(hidden[:, :-1][taken])
        loss = torch.nn.functional.cross_entropy(logits, targets[taken])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        progress(f"fine-tune step {step + 1}/{steps}: loss {losses[-1]:.3f}")
    seconds = time.perf_counter() - start
    tmp = staging(out)
    model.eval()
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    copy_rest(checkpoint, tmp, skip={p.name for p in tmp.iterdir()} | {"model.safetensors"})
    (tmp / "slmops-finetune.json").write_text(
        json.dumps({"rows": len(rows), "steps": steps, "batch": batch, "learning_rate": learning_rate, "seed": SEED})
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"losses": losses, "seconds": seconds}


def finetuned(checkpoint: Path, out: Path, progress: Callable[[str], None] = lambda _: None) -> Path:
    """The full-size fine-tune of checkpoint on the shipped training rows, made once to out."""
    if not (out / "model.safetensors").is_file():
        finetune(checkpoint, out, make_domain.read(make_domain.TRAIN), progress=progress)
    return out


def main() -> None:
    from slmops.build import sources
    from slmops.config import home

    checkpoint = sources.resolve(None).checkpoint
    start = time.perf_counter()
    print("dithered:", dithered(checkpoint, home() / "bench" / f"smollm2-dithered-{SEED}"))
    out = home() / "bench" / f"smollm2-orders-{SEED}"
    if (out / "model.safetensors").is_file():
        print("fine-tune:", out, "(cached)")
        return
    result = finetune(checkpoint, out, make_domain.read(make_domain.TRAIN), progress=print)
    print(
        f"fine-tune: {out}, {len(result['losses'])} steps in {result['seconds']:.0f} s (made in "
        f"{time.perf_counter() - start:.0f} s); loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}"
    )


if __name__ == "__main__":
    main()
