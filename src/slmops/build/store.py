"""The store and publish stages of a build: its manifest (what it is, its files' hashes), the check of a cached build
on every hit, and the copy at the user's --output, which replaces only slmops's own files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from slmops import progress
from slmops.config import home
from slmops.errors import SlmopsError
from slmops.host.fsutil import changed_files, clean_stale, copy_file, copy_tree, lock, staging_dir

MANIFEST = "slmops-manifest.json"
PACKAGED = "slmops-package.json"  # in a packaged (registered) model's folder: its files' hashes at validation


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((model_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def is_intact(build_dir: Path, manifest: dict[str, Any] | None, key: str, say: bool = True) -> bool:
    """A verified build of this key whose files are all as they were written (a cache hit)."""
    if not (manifest and manifest.get("key") == key and manifest.get("verification", {}).get("ok")):
        return False
    changed = changed_files(build_dir, manifest.get("files") or {}) if "files" in manifest else ["(no file list)"]
    if changed and say:
        progress.note(
            f"the cached build {build_dir.name} was changed since it was verified ({', '.join(changed[:3])}): rebuilding"
        )
    return not changed


def publish(build_dir: Path, output: Path, manifest: dict[str, Any]) -> Path:
    """Put a copy of the build at the user's --output. A new or empty folder gets the whole build in one rename; in
    an earlier slmops build only slmops's own files are replaced (all copied beside their places, then renamed), and every other
    file, folder and link there stays exactly as it was. A folder that is not an slmops build (unless empty), a
    registered model's folder, and slmops's own cache are refused."""
    output = output.expanduser().absolute()
    if (output / PACKAGED).exists():
        raise SlmopsError(
            f"{output} is a registered model's folder (a registry owns it); choose another --output folder, "
            "and use `slmops deploy` or `slmops register --replace` to change a registered model"
        )
    if output.resolve().is_relative_to(home().resolve()):
        raise SlmopsError(f"{output} is inside slmops's own cache ({home()}); choose an --output folder outside it")
    existing = read_manifest(output)
    if existing and existing.get("key") == manifest["key"] and not changed_files(output, manifest["files"]):
        return output
    if output.is_file() or (output.exists() and any(output.iterdir()) and existing is None):
        raise SlmopsError(f"{output} exists and is not an slmops model; choose an empty or new --output folder")
    try:
        with lock(output):
            if existing is None:
                with staging_dir(output) as tmp:
                    copy_tree(build_dir, tmp)
            else:
                _replace_ours(build_dir, output, manifest, existing)
    except PermissionError as e:
        raise SlmopsError(
            f"cannot write to {output}: permission denied ({e.filename}); choose a writable --output folder"
        ) from None
    return output


def _replace_ours(build_dir: Path, output: Path, manifest: dict[str, Any], existing: dict[str, Any]) -> None:
    """In an earlier build at output: every file of the new build copied beside its place first (the slow part),
    then each renamed into place, the earlier build's files the new one lacks removed, the manifest last, so a kill
    while copying leaves the earlier build whole. Nothing else there is touched."""
    clean_stale(output)  # a killed publish's half-copied files
    new, old = set(manifest["files"]), set(existing.get("files") or {})
    for rel in sorted(new):
        target = output / rel
        for parent in [output / p for p in Path(rel).parents if p != Path(".")]:
            if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
                raise SlmopsError(f"{parent} is not a folder of the earlier build; move it away and publish again")
        if target.is_dir() and not target.is_symlink():
            raise SlmopsError(f"{target} is a folder where the build has a file; move it away and publish again")
    copies = {}
    try:
        for rel in sorted(new) + [MANIFEST]:
            target = output / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            copies[target] = _copy_beside(build_dir / rel, target)
        for target, tmp in copies.items():  # the manifest last (it is the last key)
            if target.name == MANIFEST:
                for rel in sorted(old - new):
                    if (output / rel).is_file() and not (output / rel).is_symlink():
                        (output / rel).unlink()
            os.replace(tmp, target)
    finally:
        for tmp in copies.values():
            tmp.unlink(missing_ok=True)


def _copy_beside(source: Path, target: Path) -> Path:
    """A copy of source beside target, under a name clean_stale recognises (a killed publish's leftover)."""
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}-copy")
    try:
        copy_file(source, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp
