"""Registering, listing, finding and removing deployed models, through whichever registry plugin is chosen."""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path
from typing import Any

from . import implementations, progress, templates
from .config import Config
from .convert import read_manifest
from .errors import SlmopsError
from .fsutil import dir_size
from .roles import Registry, RegistryEntry

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
REGISTRY_ENV = "SLMOPS_REGISTRY_DIR"


def check_name(name: str) -> str:
    if not NAME_RE.match(name or "") or ".." in name:
        raise SlmopsError(f"invalid model name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, no '..'")
    return name


def open_registry(cfg: Config, backend: str | None = None) -> Registry:
    registry = implementations.by_name(implementations.registries(), backend or cfg.get("registry.backend"), "registry")
    where = cfg.get("registry.cache_dir") or os.environ.get(REGISTRY_ENV)
    registry.root = Path(where).expanduser().resolve() if where else registry.default_location()
    return registry


def register(registry: Registry, model_dir: Path, name: str, family: str = "auto", version: str = "1",
             description: str = "", replace: bool = True) -> dict[str, Any]:
    """Choose and check the prompt template, write inference_model.json, record the model in the registry."""
    check_name(name)
    model_dir = Path(model_dir)
    if not (model_dir / "genai_config.json").is_file():
        raise SlmopsError(f"{model_dir} is not an ONNX Runtime GenAI model (no genai_config.json); convert it first with `slmops convert`")
    with progress.step("Choosing and checking the prompt template"):
        chosen = templates.choose(model_dir, family)
        check = templates.fidelity(model_dir, chosen)
    if not check["ok"]:
        bad = next(r for r in check["conversations"] if not r["ok"])
        raise SlmopsError(f"template {chosen.family.name} differs from the model's chat template in '{bad['conversation']}' "
                          f"at character {bad.get('first_diff_char')} / token {bad.get('first_diff_token')}: "
                          f"{bad.get('template')!r} vs {bad.get('tokenizer')!r}; pass --family with the right family")
    progress.note(f"template: {chosen.family.name} ({chosen.how}); matches the tokenizer's chat template")
    manifest = read_manifest(model_dir) or {}
    entry = RegistryEntry(
        name=name, id=f"{name}:1", path="", family=chosen.family.name,
        precision=manifest.get("options", {}).get("precision", ""), size_bytes=dir_size(model_dir),
        registered_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        version=version, description=description or f"{name}, deployed by slmops", registry=registry.name)
    doc = templates.inference_model(name, entry.description, version, chosen)
    with progress.step(f"Registering {name} with {registry.name}"):
        entry = registry.register(model_dir, entry, doc, replace)
    return {"entry": entry.__dict__, "template": {"family": chosen.family.name, "how": chosen.how,
                                                  "default_system": chosen.default_system, "fidelity": check}}


def find(registry: Registry, name: str) -> RegistryEntry:
    entries = registry.list()
    for e in entries:
        if e.name == name or e.id == name:
            return e
    known = ", ".join(sorted(e.name for e in entries)) or "none registered yet"
    raise SlmopsError(f"no model named {name!r} in {registry.name} at {registry.root}; models: {known}")
