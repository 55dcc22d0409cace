"""Registering, listing, finding and removing deployed models, through whichever registry plugin is chosen."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmops import progress, templates
from slmops.build.store import PACKAGED, read_manifest
from slmops.config import Config, home
from slmops.errors import SlmopsError, UsageError
from slmops.host import machine
from slmops.host.fsutil import (
    changed_since_record,
    check_disk,
    clean_stale,
    copy_tree,
    dir_size,
    record_files,
    regular_files,
    write_json_atomic,
)
from slmops.plugin import provided
from slmops.plugin.roles import Registry, RegistryEntry
from slmops.run import runtime

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
REGISTRY_ENV = "SLMOPS_REGISTRY_DIR"


def check_name(name: str) -> str:
    # fullmatch: `$` alone would accept a trailing newline
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise SlmopsError(
            f"invalid model name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, no '..'"
        )
    return name


def location_variable(registry_name: str) -> str:
    """The environment variable that places one registry: SLMOPS_REGISTRY_DIR_<NAME>, e.g. ..._FOUNDRY_LOCAL."""
    return f"{REGISTRY_ENV}_{re.sub(r'[^A-Z0-9]', '_', registry_name.upper())}"


def open_registry(cfg: Config, backend: str | None = None) -> Registry:
    """The registry named by backend (else [registry] backend), at its own folder: $SLMOPS_REGISTRY_DIR_<NAME>;
    for the configured registry also [registry] cache_dir or $SLMOPS_REGISTRY_DIR; else its default_location().
    Registries never share a folder by default: one named with --registry does not take the configured one's."""
    registry = provided.by_name(provided.registries(), backend or cfg.get("registry.backend"), "registry")
    variable = location_variable(registry.name)
    where = os.environ.get(variable)
    if not where and registry.name == cfg.get("registry.backend"):
        variable = "[registry] cache_dir" if cfg.get("registry.cache_dir") else REGISTRY_ENV
        where = cfg.get("registry.cache_dir") or os.environ.get(REGISTRY_ENV)
    registry.root = Path(where).expanduser().resolve() if where else registry.default_location()
    if registry.root.exists() and not registry.root.is_dir():
        raise UsageError(
            f"{variable if where else 'the registry location'} {registry.root} is a file, not a folder; "
            "point it at a folder (it is created if missing)"
        )
    return registry


@dataclass
class Package:
    """A model folder made ready to register: a copy of the build with its checked inference_model.json."""

    path: Path
    entry: RegistryEntry
    inference_model: dict[str, Any]
    template: dict[str, Any]


@contextlib.contextmanager
def package(model_dir: Path, name: str, cfg: Config, registry_name: str) -> Iterator[Package]:
    """Choose and check the prompt template ([model] family), and stage a copy of model_dir with
    inference_model.json ([registry] version and description) beside slmops's cache. The staged folder is what gets
    validated and registered; it is deleted afterwards."""
    check_name(name)
    family, version, description = cfg.get("model.family"), cfg.get("registry.version"), cfg.get("registry.description")
    model_dir = Path(model_dir)
    if not (model_dir / "genai_config.json").is_file():
        raise SlmopsError(
            f"{model_dir} is not an ONNX Runtime GenAI model (no genai_config.json); convert it first with `slmops convert`"
        )
    regular_files(model_dir)  # links and device files refused before anything reads the folder
    machine.check_runs_here(model_dir)
    with progress.step("Choosing and checking the prompt template"):
        chosen = templates.choose(model_dir, family)
        check = templates.fidelity(model_dir, chosen)
    if not check["ok"]:
        bad = next(r for r in check["conversations"] if not r["ok"])
        raise SlmopsError(
            f"template {chosen.family.name} differs from the model's chat template in '{bad['conversation']}' "
            f"at character {bad.get('first_diff_char')} / token {bad.get('first_diff_token')}: "
            f"{bad.get('template')!r} vs {bad.get('tokenizer')!r}; pass --family with the right family"
        )
    if check["checked"]:
        progress.note(f"template: {chosen.family.name} ({chosen.how}); matches the tokenizer's chat template")
    else:
        progress.note(f"template: {chosen.family.name} ({chosen.how}); not checked: {check['reason']}")
    manifest = read_manifest(model_dir) or {}
    entry = RegistryEntry(
        name=name,
        id=f"{name}:1",
        path="",
        family=chosen.family.name,
        precision=manifest.get("options", {}).get("precision", ""),
        size_bytes=dir_size(model_dir),
        registered_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        version=version,
        description=description or f"{name}, deployed by slmops",
        registry=registry_name,
    )
    doc = templates.inference_model(name, entry.description, version, chosen)
    staged_root = home() / "staged"
    clean_stale(staged_root)
    check_disk(staged_root, dir_size(model_dir), "staging the model")
    folder = Path(tempfile.mkdtemp(dir=staged_root, prefix=f".{name}.partial-{os.getpid()}-"))
    try:
        copy_tree(model_dir, folder, skip=("inference_model.json",))
        runtime.use_every_core(folder)  # a folder built by hand runs on every core too
        if not templates.read_model_info(model_dir).chat_template:  # a base model: no runtime chats without one
            with progress.step(f"Writing the {chosen.family.name} chat template for a model that has none"):
                check["written"] = templates.write_chat_template(folder, chosen.family, chosen.default_system)
        write_json_atomic(folder / "inference_model.json", doc)
        # what validation sees: a registry lists the model as ok, and serves it, only while these files are unchanged
        record_files(folder, PACKAGED, skip=("inference_model.json",))
        yield Package(
            folder,
            entry,
            doc,
            {
                "family": chosen.family.name,
                "how": chosen.how,
                "default_system": chosen.default_system,
                "fidelity": check,
            },
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def add(registry: Registry, pkg: Package, replace: bool = True) -> dict[str, Any]:
    """Add a packaged model to a model registry (the registry plugin's register()), last: whatever was registered
    under its name stays until then."""
    entry = dataclasses.replace(pkg.entry, registry=registry.name)
    with progress.step(f"Registering {entry.name} with {registry.name}"):
        entry = registry.register(pkg.path, entry, pkg.inference_model, replace)
    return {"entry": entry.__dict__, "template": pkg.template}


def entries(registry: Registry) -> list[RegistryEntry]:
    """The registry's entries, each folder checked against the files it was validated with: one whose files changed
    since is listed as "changed" (and never served) rather than "ok"."""
    listed = registry.list()
    for entry in listed:
        if entry.status == "ok" and entry.path:
            entry.status = "changed" if changed_since_validation(Path(entry.path)) else "ok"
    return listed


def changed_since_validation(folder: Path) -> list[str]:
    """The files of a registered folder that differ from what was validated ([] for a folder slmops did not
    package: nothing to compare with)."""
    return changed_since_record(folder, PACKAGED) or []


def find(registry: Registry, name: str) -> RegistryEntry:
    entries = registry.list()
    for e in entries:
        if e.name == name or e.id == name:
            return e
    known = ", ".join(sorted(e.name for e in entries)) or "none registered yet"
    raise SlmopsError(f"no model named {name!r} in {registry.name} at {registry.root}; models: {known}")


def find_runnable(registry: Registry, name: str) -> RegistryEntry:
    """A registered model whose folder is there, or a clear error when it is gone."""
    entry = find(registry, name)
    if not entry.path or not (Path(entry.path) / "genai_config.json").is_file():
        raise SlmopsError(
            f"{entry.name} is registered but its folder {entry.path or '(none)'} is missing; "
            f"remove the entry with `slmops cache rm {entry.name}` and register the model again"
        )
    changed = changed_since_validation(Path(entry.path))
    if changed:
        raise SlmopsError(
            f"{entry.name}'s files changed after it was validated ({', '.join(changed[:3])}); it is not served: "
            f"deploy or register it again (`slmops register DIR --name {entry.name} --replace`)"
        )
    machine.check_runs_here(Path(entry.path))
    return entry
