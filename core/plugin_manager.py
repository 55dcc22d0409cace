"""The plugin manager: built-in plugins first, then every package with an ``slmops`` entry point."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass

import pluggy

from . import hookspecs

DEFAULT_PLUGINS = (
    "slmops.plugins.model_builder",
    "slmops.plugins.olive",
    "slmops.plugins.matmul_nbits",
    "slmops.plugins.gguf_native",
    "slmops.plugins.templates",
    "slmops.plugins.foundry_local",
    "slmops.plugins.ort_genai_bench",
)

# SLMOPS_LOAD_PLUGINS="a,b" loads only those third-party plugins ("" loads none);
# SLMOPS_DISABLE_PLUGINS="x,y" skips plugins by name, built-in ones included.
LOAD_ENV = "SLMOPS_LOAD_PLUGINS"
DISABLE_ENV = "SLMOPS_DISABLE_PLUGINS"


@dataclass
class LoadError:
    name: str
    package: str
    error: str


pm = pluggy.PluginManager("slmops")
pm.add_hookspecs(hookspecs)
load_errors: list[LoadError] = []
_package_of: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)


def _names(env: str) -> set[str] | None:
    value = os.environ.get(env)
    if value is None:
        return None
    return {n.strip() for n in value.split(",") if n.strip()}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _load() -> None:
    disabled = _names(DISABLE_ENV) or set()
    for module_name in DEFAULT_PLUGINS:
        short = module_name.rsplit(".", 1)[1]
        if short in disabled or module_name in disabled:
            continue
        pm.register(importlib.import_module(module_name), name=module_name)
        _package_of[module_name] = ("slmops", _version("slmops"))
    allowed = _names(LOAD_ENV)
    for ep in importlib.metadata.entry_points(group="slmops"):
        if (allowed is not None and ep.name not in allowed) or ep.name in disabled:
            continue
        dist = ep.dist.name if ep.dist else "?"
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as e:  # a broken plugin must not break commands that do not need it
            load_errors.append(LoadError(ep.name, dist, f"{type(e).__name__}: {e}"))
            continue
        _package_of[ep.name] = (dist, ep.dist.version if ep.dist else "")


_load()


def warn_load_errors() -> None:
    for err in load_errors:
        print(f"slmops: warning: plugin {err.name!r} ({err.package}) failed to load: {err.error}", file=sys.stderr)


def plugin_table() -> list[dict]:
    """One row per loaded plugin: name, package, version, hooks."""
    rows = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        dist, version = _package_of.get(name, ("?", ""))
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        rows.append({"name": name, "package": dist, "version": version, "hooks": hooks})
    return sorted(rows, key=lambda r: (r["package"] != "slmops", r["name"]))
