"""Learned scales: the quantized blocks' scales (and minimums) fitted against the source model's own next-token
distributions, as mlx-lm's DWQ does. GPTQ's codes stay; each block's scale is multiplied by exp(a) and its minimum
moved by b of its scale, a and b learned by gradient descent on KL(source || quantized) over the calibration text,
the whole model at once (GPTQ sees one layer's output at a time). In torch, on the source checkpoint; opt-in
(gptq's learned_scales option): a step is a forward and backward pass over WINDOW tokens."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from slmops.plugins import gguf_blocks

Runs = list[tuple[int, int, gguf_blocks.BlockForm]]
RATE = 3e-5  # Adam's rate on a and b: 1e-3 and 1e-4 overfitted the calibration text (held-out KL rose), 3e-5 did not
WINDOW = 512  # tokens a step


def memory_needed(matrices: dict[str, np.ndarray]) -> int:
    """Bytes a fit takes, about: the source in float32, its weights dequantized and their gradients (4 copies),
    and the activations of a window (the logits: WINDOW x vocabulary, a few times)."""
    weights = sum(m.size for m in matrices.values())
    vocabulary = max(m.shape[0] for m in matrices.values())
    return 4 * (4 * weights + 8 * WINDOW * vocabulary)


def locate(model, matrices: dict[str, np.ndarray]) -> dict[str, tuple[str, int]]:
    """torch parameter name -> (ONNX weight name, first row) for every 2-D parameter whose rows are those of one of
    matrices (ONNX weight name -> fp32 [rows = outputs, cols = inputs]), found by their exact values (a packed QKV,
    a tied embedding and lm_head are found wherever the graph keeps them)."""
    rows: dict[bytes, tuple[str, int]] = {}
    for name, m in matrices.items():
        gguf_blocks.index_rows(rows, name, m)
    found = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        if p.ndim != 2:
            continue
        w = p.detach().numpy()
        at = rows.get(gguf_blocks.row_key(w[0]))
        if at is None:
            continue
        name, start = at
        m = matrices[name]
        if start + w.shape[0] <= m.shape[0] and np.array_equal(m[start : start + w.shape[0]], w):
            found[pname] = (name, start)
    return found


class LearnedScales:
    """The quantized model as torch sees it: per block form, its fixed centred codes, the starting scale and offset,
    and the learned a (and b, where the form has a minimum)."""

    def __init__(self, forms: dict[str, Runs]):
        import torch

        self.forms = forms
        self.parts: dict[str, list] = {}
        for name, runs in forms.items():
            parts = []
            for _, _, form in runs:
                rows = form.codes.shape[0]
                c = form.codes.reshape(rows, -1, form.block).astype(np.float32) - form.zero_points[..., None]
                s0 = torch.from_numpy(form.scales.astype(np.float32))
                o0 = None if form.offsets is None else torch.from_numpy(form.offsets.astype(np.float32))
                a = torch.zeros_like(s0, requires_grad=True)
                b = None if o0 is None else torch.zeros_like(s0, requires_grad=True)
                parts.append((torch.from_numpy(c), s0, o0, a, b))
            self.parts[name] = parts

    def parameters(self) -> list:
        return [t for parts in self.parts.values() for p in parts for t in p[3:] if t is not None]

    def matrix(self, name: str):
        import torch

        out = []
        for c, s0, o0, a, b in self.parts[name]:
            v = (s0 * torch.exp(a))[..., None] * c
            if o0 is not None:
                v = v + (o0 + s0 * b)[..., None]
            out.append(v.reshape(v.shape[0], -1))
        return torch.cat(out) if len(out) > 1 else out[0]

    def write(self) -> None:
        """The learned scales and minimums into the block forms, in fp16 as the blocks hold them."""
        import torch

        with torch.no_grad():
            for name, runs in self.forms.items():
                for (_, _, form), (_, s0, o0, a, b) in zip(runs, self.parts[name], strict=True):
                    form.scales = gguf_blocks.half((s0 * torch.exp(a)).numpy())
                    if o0 is not None:
                        form.offsets = gguf_blocks.half((o0 + s0 * b).numpy())


def windows_of(tokens: list[int]) -> list[list[int]]:
    """The calibration tokens as whole windows of WINDOW (one, shorter, where there are fewer)."""
    return [tokens[i : i + WINDOW] for i in range(0, max(len(tokens) - WINDOW, 0) + 1, WINDOW)]


def load_source(source_dir: Path, matrices: dict[str, np.ndarray], threads: int | None):
    """(the source checkpoint in torch, float32, eval mode; torch parameter -> (ONNX weight, first row) for each of
    matrices), or why not: a weight the checkpoint does not hold as the graph does."""
    import torch
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(source_dir), dtype=torch.float32)
    model.eval()
    where = locate(model, matrices)
    missing = matrices.keys() - {name for name, _ in where.values()}
    if missing:
        return f"{len(missing)} weights not found in the checkpoint (e.g. {min(missing)})"
    return model, where


def distill(
    source_dir: Path,
    matrices: dict[str, np.ndarray],
    forms: dict[str, Runs],
    tokens: list[int],
    steps: int,
    rate: float = RATE,
    threads: int | None = None,
    show: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Fit the scales and minimums of forms (ONNX weight name -> runs of block forms, changed in place) so the
    quantized model's next-token distributions on tokens match the source's (matrices: the fp32 weights, to find
    each in the checkpoint). The first window is held out and scored before and after. Returns what it measured."""
    import torch
    from torch.func import functional_call

    started = time.perf_counter()
    torch.manual_seed(0)
    used = {n for n, runs in forms.items() if runs}
    loaded = load_source(source_dir, {n: matrices[n] for n in used}, threads)
    if isinstance(loaded, str):  # nothing learned, the blocks as rounded
        return {"steps": 0, "why": loaded}
    model, where = loaded
    model.requires_grad_(False)
    learned = LearnedScales({n: forms[n] for n in used})

    def weights() -> dict:
        full = {name: learned.matrix(name) for name in used}
        return {p: full[name][start : start + model.get_parameter(p).shape[0]] for p, (name, start) in where.items()}

    def kl(ids: list[int], grad: bool):
        x = torch.tensor([ids])
        with torch.no_grad():
            target = torch.log_softmax(model(x).logits, -1)
        with torch.set_grad_enabled(grad):
            got = torch.log_softmax(functional_call(model, weights(), (x,), tie_weights=False).logits, -1)
            return (target.exp() * (target - got)).sum(-1).mean()

    windows = windows_of(tokens)
    held, train = windows[0], windows[1:] or windows
    optimizer = torch.optim.Adam(learned.parameters(), lr=rate)
    before = float(kl(held, False))
    order = np.random.default_rng(0)
    for step in range(steps):
        loss = kl(train[order.integers(len(train))], True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if show:
            show(step + 1, steps, f"steps of learned scales (KL {loss.item():.4f})")
    after = float(kl(held, False))
    learned.write()
    return {
        "steps": steps,
        "rate": rate,
        "held_out_kl": [float(f"{before:.4g}"), float(f"{after:.4g}")],
        "seconds": round(time.perf_counter() - started),
    }


def fisher(
    source_dir: Path,
    matrices: dict[str, np.ndarray],
    tokens: list[int],
    threads: int | None = None,
    show: Callable[[int, int, str], None] | None = None,
) -> dict[str, np.ndarray] | str:
    """How much each weight moves the source's next-token distributions: the diagonal of its Fisher information,
    E[g^2] of the log-likelihood's gradient with next tokens sampled from the source itself, one window of the
    calibration tokens at a time. Half of sum(F * dW^2) is, to second order, the KL a change dW of the weights costs,
    the same unit for every weight (a layer's output error is not: it says nothing of what the layers after it
    make of it). Returns ONNX weight name -> F [rows, cols], or why it could not (a model transformers cannot load, a
    weight not in the checkpoint)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    try:  # a model transformers cannot load without its remote code: ranked by output error instead, not run
        loaded = load_source(source_dir, matrices, threads)
    except (OSError, ValueError) as e:
        return f"transformers cannot load the source ({' '.join(str(e).split())[:120]})"
    if isinstance(loaded, str):
        return loaded
    model, where = loaded
    seen, params = set(), {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        if pname in where and id(p) not in seen:  # a tied embedding and lm_head: one parameter, counted once
            seen.add(id(p))
            params[pname] = p
    out = {name: np.zeros(m.shape, dtype=np.float32) for name, m in matrices.items()}
    windows = windows_of(tokens)
    for i, ids in enumerate(windows):
        model.zero_grad(set_to_none=True)
        logits = model(torch.tensor([ids])).logits[0]
        with torch.no_grad():
            sampled = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
        torch.nn.functional.cross_entropy(logits, sampled, reduction="sum").backward()
        for pname, p in params.items():
            name, start = where[pname]
            out[name][start : start + p.shape[0]] += (p.grad.detach() ** 2).numpy() / len(windows)
        if show:
            show(i + 1, len(windows), "windows of the source's sensitivity")
    return out
