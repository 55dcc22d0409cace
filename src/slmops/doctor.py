"""`slmops doctor`: is this machine able to run the pipeline?"""

from __future__ import annotations

import importlib.metadata
import shutil
import sys
from typing import Any

from slmops.config import home
from slmops.extras import DISTRIBUTIONS, EXTRAS, INSTALL, names_an_extra

TESTED = {
    "olive-ai": "0.13.0",
    "onnxruntime": "1.31.0",
    "onnxruntime-genai": "0.18.0",
    "onnx": "1.23.2",
    "transformers": "5.23.0",
    "torch": "2.13.0",
    "foundry-local-sdk": "2.2.1",
    "gguf": "0.19.0",
    "accelerate": "1.15.0",
    "pluggy": "1.7.0",
    "click": "8.5.1",
}
# Each converts at fp32, int8 and int4 in tests/test_architectures.py, its fp32 build matching torch (Llama 3.x and
# SmolLM2 as llama; Qwen2/2.5; Qwen3; Phi-3, Phi-3.5 and Phi-4-mini, short and LongRoPE; Gemma 2; Gemma 3 text;
# Mistral; Granite 3; SmolLM3). The builder knows more; those are not tested here.
TESTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "MistralForCausalLM",
    "GraniteForCausalLM",
    "SmolLM3ForCausalLM",
)
MIN_RAM_GB = 8  # the deployment guide's prerequisite
MIN_DISK_GB = 5


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")[:3] if p.isdigit())


def checks() -> list[dict[str, Any]]:
    """Rows of check, status (ok/warn/fail) and detail."""
    import psutil

    rows: list[dict[str, Any]] = []

    def add(check: str, status: str, detail: str) -> None:
        rows.append({"check": check, "status": status, "detail": detail})

    py = sys.version_info
    add("python", "ok" if py >= (3, 11) else "fail", f"{py.major}.{py.minor}.{py.micro} (needs 3.11+)")
    for dist, tested in TESTED.items():
        found = _version(dist)
        if found is None and dist in DISTRIBUTIONS:  # an extra: only the commands that use it need it
            add(dist, "warn", f"not installed (tested: {tested}); {INSTALL.format(DISTRIBUTIONS[dist])}")
        elif found is None:
            add(dist, "fail", f"not installed (tested: {tested}); run make install")
        else:
            add(dist, "ok" if found == tested else "warn", found if found == tested else f"{found} (tested: {tested})")
    genai = _version("onnxruntime-genai")
    if genai and _tuple(genai) < (0, 18):
        add(
            "model builder",
            "fail",
            f"onnxruntime-genai {genai} is too old for slmops (Gemma 3, LongRoPE Phi and the options it passes need "
            "0.18); run make install",
        )
    try:
        import onnxruntime_genai as og

        add("ORT GenAI runtime", "ok", f"onnxruntime_genai {og.__version__} imports")
    except Exception as e:
        add("ORT GenAI runtime", "fail", f"{type(e).__name__}: {e}")
    add("architectures", "ok", "tested: " + ", ".join(a.removesuffix("ForCausalLM") for a in TESTED_ARCHITECTURES))
    from slmops.plugin.provided import plugin_of, registries, safely

    for registry in registries():
        problem = safely(registry, "runtime_problem", fallback="its runtime_problem() raised (see the warning)")
        status = "fail" if problem else "ok"
        if problem and names_an_extra(problem):  # its extra is not installed: the core runs without it
            status = "warn"
        add(f"registry {registry.name}", status, problem or f"ready ({plugin_of(registry)})")
    ram = psutil.virtual_memory().available / 1e9
    add("free RAM", "ok" if ram >= MIN_RAM_GB else "warn", f"{ram:.1f} GB available (guide asks for {MIN_RAM_GB} GB)")
    folder = home()
    folder.mkdir(parents=True, exist_ok=True)
    disk = shutil.disk_usage(folder).free / 1e9
    add(
        "free disk", "ok" if disk >= MIN_DISK_GB else "fail", f"{disk:.1f} GB free at {folder} (needs {MIN_DISK_GB} GB)"
    )
    return rows


def own_dependencies(dist: str = "slmops") -> set[str]:
    """The distributions slmops needs to run, normalised names: its own requirements with its extras' (torch, serve,
    ...; not test), and theirs (their extras left out)."""
    import importlib.metadata

    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [dist]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            extras = ("", *EXTRAS, "all") if name == canonicalize_name(dist) else ("",)
            if req.marker is None or any(req.marker.evaluate({"extra": extra}) for extra in extras):
                todo.append(req.name)
    seen.discard(canonicalize_name(dist))
    return seen
