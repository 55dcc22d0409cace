"""The adapters of a registered base: one base folder (built with LoRA inputs: `convert --adapter-mode adapter`) and
one ORT GenAI adapter file per fine-tune, added, listed and removed in place (`slmops adapters`), served per request
as BASE:ADAPTER.

An adapter is added by building the base again from its recorded source and options with the new LoRA kept apart:
the build's graph and weights must be the registered base's byte for byte (a LoRA on other modules, or made for
another model, is refused), and only its adapter file is copied into the registered folder. Each adapter gets a
fidelity row against its merged source (the fp32 build of base + LoRA merged), written beside it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from slmops import progress
from slmops import registry as reg
from slmops.build import convert as conv
from slmops.build import store
from slmops.config import home
from slmops.errors import SlmopsError
from slmops.host.fsutil import file_hashes, lock, record_files, write_json_atomic
from slmops.measure import quality
from slmops.plugin.roles import MODEL_FILES, Registry
from slmops.run import adapters

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FIDELITY = ".json"  # adapters/NAME.json: the adapter's fidelity against its merged source


def base_folder(registry: Registry, base: str) -> tuple[Path, dict[str, Any]]:
    """A registered base that can take adapters: its folder and its build manifest."""
    entry = reg.find_runnable(registry, base)
    folder = Path(entry.path)
    manifest = store.read_manifest(folder) or {}
    if manifest.get("options", {}).get("adapter_mode") != "adapter":
        raise SlmopsError(
            f"{entry.name} was built without LoRA inputs, so it cannot take adapters; build the base with "
            "`slmops convert SOURCE --adapter LORA --adapter-mode adapter` and register that"
        )
    return folder, manifest


def add(registry: Registry, base: str, name: str, lora: Path, domain: Path | None = None) -> dict[str, Any]:
    """Add the PEFT LoRA in lora to the registered base as adapter name; returns its fidelity row."""
    if not NAME.match(name):
        raise SlmopsError(f"adapter name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)")
    folder, manifest = base_folder(registry, base)
    if name in adapters.find(folder):
        raise SlmopsError(
            f"{base} already has an adapter {name!r}; remove it first (`slmops adapters rm {base} {name}`)"
        )
    source = manifest["source"]["spec"]
    options = {k: v for k, v in manifest["options"].items() if v is not None}
    options.update(adapter=Path(lora), adapter_mode="adapter")
    built = conv.convert(source, options)  # a LoRA that does not belong to the source is refused here
    ours, theirs = file_hashes(folder), file_hashes(built.path)
    differs = [f for f in MODEL_FILES if ours.get(f) != theirs.get(f)]
    if differs:
        raise SlmopsError(
            f"{lora} does not fit {base}: the base built with it differs from the registered one ({', '.join(differs)}); "
            "an adapter must target the same modules of the same model as the base's first one"
        )
    made = next(iter(adapters.find(built.path).values()))
    target = folder / adapters.ADAPTERS_DIR / f"{name}{adapters.SUFFIX}"
    with folder_lock(folder):
        staged = target.with_name(f".{target.name}.{os.getpid()}")
        staged.write_bytes(made.read_bytes())
        os.replace(staged, target)
        try:
            row = fidelity(folder, name, source, options, domain)
        except BaseException:
            target.unlink(missing_ok=True)  # an adapter that cannot be measured is not added
            raise
        write_json_atomic(target.with_name(name + FIDELITY), row)
        record_files(folder, reg.PACKAGED, skip=("inference_model.json",))  # validated files, the adapter now too
    return row


def fidelity(folder: Path, name: str, source: str, options: dict[str, Any], domain: Path | None) -> dict[str, Any]:
    """The registered base with adapter name on, against the fp32 build of its source with the LoRA merged."""
    from slmops.run.runtime import Session

    merged = conv.convert(source, {**options, "precision": "fp32", "adapter_mode": "merge"})
    reference, tuned = Session(merged.path), Session(folder, name)
    with progress.step(f"Measuring adapter {name} against its merged source"):
        chunk = min(quality.CHUNK, reference.context_length - 1, tuned.context_length - 1)  # as quality.compare
        q = quality.score(reference.logits, {name: tuned.logits}, reference.tokens, None, chunk, reference.prefix)[name]
    size = adapters.find(folder)[name].stat().st_size
    row = {"adapter": name, "size_mb": round(size / 1e6, 2), **q.to_json()}
    if domain:
        from slmops.measure.domain import score
        from slmops.run.chat import OrtGenAIChat

        rows = quality.load_set(domain)
        with progress.step(f"Scoring {domain.name} with adapter {name} and on its merged source"):
            tuned_chat = OrtGenAIChat(folder, name)
            row["domain_accuracy"] = score(tuned_chat, rows)["accuracy"]
            row["source_domain_accuracy"] = score(OrtGenAIChat(merged.path), rows)["accuracy"]
    return row


def listing(registry: Registry, base: str) -> list[dict[str, Any]]:
    """Each adapter of the registered base, with its fidelity row where one was measured."""
    folder, _ = base_folder(registry, base)
    rows = []
    for name, path in adapters.find(folder).items():
        try:
            row = json.loads(path.with_name(name + FIDELITY).read_text())
        except (OSError, ValueError):
            row = {"adapter": name, "size_mb": round(path.stat().st_size / 1e6, 2)}
        rows.append({**row, "model": f"{base}:{name}"})
    return rows


def remove(registry: Registry, base: str, name: str) -> None:
    folder, _ = base_folder(registry, base)
    found = adapters.find(folder)
    if name not in found:
        raise SlmopsError(f"{base} has no adapter {name!r} (it has: {', '.join(found) or 'none'})")
    with folder_lock(folder):
        found[name].unlink()
        found[name].with_name(name + FIDELITY).unlink(missing_ok=True)
        record_files(folder, reg.PACKAGED, skip=("inference_model.json",))


def folder_lock(folder: Path):
    """One change at a time to a registered folder's adapters, the lock kept in slmops's home (not in the folder)."""
    import hashlib

    return lock(home() / "locks" / hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16])
