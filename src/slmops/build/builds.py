"""`slmops builds`: the build cache (SLMOPS_HOME/builds), which grows with every source and option tried: list it
with what uses each build, remove one, or prune what nothing uses."""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path
from typing import Any

from slmops.build.store import MANIFEST, read_manifest
from slmops.config import home
from slmops.errors import SlmopsError
from slmops.host.fsutil import dir_size, lock
from slmops.plugin.roles import Registry


def builds_dir() -> Path:
    return home() / "builds"


def users(registry: Registry | None) -> dict[str, list[str]]:
    """build key -> what uses it: deploy records of this machine, and models registered from it."""
    used: dict[str, list[str]] = {}
    for record in sorted((home() / "deploys").glob("*.json")):
        try:
            build = json.loads(record.read_text())["build"]
        except (OSError, ValueError, KeyError):
            continue
        manifest = read_manifest(Path(build)) or {}
        if manifest.get("key"):
            used.setdefault(manifest["key"], []).append(f"deploy {record.stem}")
    for entry in registry.list() if registry is not None else []:
        manifest = read_manifest(Path(entry.path)) if entry.path else None
        if manifest and manifest.get("key"):
            used.setdefault(manifest["key"], []).append(f"registered {entry.name}")
    return used


def list_builds(registry: Registry | None) -> list[dict[str, Any]]:
    used = users(registry)
    now = datetime.datetime.now(datetime.UTC)
    rows = []
    for folder in (
        sorted(p for p in builds_dir().glob("*") if p.is_dir() and not p.name.startswith("."))
        if builds_dir().is_dir()
        else []
    ):
        manifest = read_manifest(folder) or {}
        created = manifest.get("created_at")
        age = (now - datetime.datetime.fromisoformat(created)).days if created else None
        rows.append(
            {
                "build": folder.name,
                "precision": manifest.get("options", {}).get("precision", "?"),
                "size_bytes": dir_size(folder),
                "created_at": created,
                "age_days": age,
                "used_by": used.get(manifest.get("key", ""), []),
                "path": str(folder),
            }
        )
    return rows


def remove(name: str) -> Path:
    folder = builds_dir() / name
    if "/" in name or name.startswith(".") or not (folder / MANIFEST).is_file():
        known = ", ".join(r["build"] for r in list_builds(None)) or "none"
        raise SlmopsError(f"no build named {name!r} in {builds_dir()}; builds: {known}")
    with lock(folder):
        doomed = folder.with_name(f".{name}.partial-{os.getpid()}-removing")  # a kill leaves it to clean_stale
        folder.rename(doomed)
        shutil.rmtree(doomed)
    return folder


def prune(registry: Registry | None, older_than_days: float = 0, dry_run: bool = False) -> list[dict[str, Any]]:
    """The builds nothing uses (and older than older_than_days), removed unless dry_run; returns them."""
    doomed = [
        row
        for row in list_builds(registry)
        if not row["used_by"] and (row["age_days"] is None or row["age_days"] >= older_than_days)
    ]
    for row in doomed if not dry_run else []:
        remove(row["build"])
    return doomed
