"""The plugin manager: built-in plugins first, then every package with an ``slmops`` entry point.

Plugins are loaded once, on first use (importing a slmops module loads none). A plugin that fails to import, or
raises inside a hook, is disabled with one warning naming it and the hook; every other plugin goes on working.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pluggy

from slmops.plugin import hookspecs

DEFAULT_PLUGINS = (
    "slmops.plugins.model_builder",
    "slmops.plugins.olive",
    "slmops.plugins.matmul_nbits",
    "slmops.plugins.gguf_native",
    "slmops.plugins.imatrix",
    "slmops.plugins.gptq",
    "slmops.plugins.templates",
    "slmops.plugins.foundry_local",
    "slmops.plugins.ort_genai_bench",
)

# SLMOPS_LOAD_PLUGINS="a,b" loads only those third-party plugins ("" loads none);
# SLMOPS_DISABLE_PLUGINS="x,y" skips plugins, built-in ones included. A name is a plugin's entry point name
# (or a built-in's short name), or a distribution: then all of that distribution's plugins.
LOAD_ENV = "SLMOPS_LOAD_PLUGINS"
DISABLE_ENV = "SLMOPS_DISABLE_PLUGINS"


@dataclass
class Problem:
    """A plugin that could not be loaded, or was disabled after a hook raised."""

    name: str
    package: str
    error: str
    hook: str = ""


pm = pluggy.PluginManager("slmops")
pm.add_hookspecs(hookspecs)
problems: list[Problem] = []
_package_of: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)
_loaded = False
_warned: set[str] = set()


def warn(message: str) -> None:
    """One line on stderr, once per message and process."""
    if message not in _warned:
        _warned.add(message)
        print(f"slmops: warning: {message}", file=sys.stderr)


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


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _load() -> None:
    disabled = _names(DISABLE_ENV) or set()
    allowed = _names(LOAD_ENV)
    seen: set[str] = set()  # every name the two variables could have meant

    def named(names: set[str], *candidates: str) -> bool:
        return bool({_normal(n) for n in names} & {_normal(c) for c in candidates})

    for module_name in DEFAULT_PLUGINS:
        short = module_name.rsplit(".", 1)[1]
        seen |= {short, module_name, "slmops"}
        if named(disabled, short, module_name):
            continue
        pm.register(importlib.import_module(module_name), name=module_name)
        _package_of[module_name] = ("slmops", _version("slmops"))
    for ep in importlib.metadata.entry_points(group="slmops"):
        dist = ep.dist.name if ep.dist else "?"
        seen |= {ep.name, dist}
        if (allowed is not None and not named(allowed, ep.name, dist)) or named(disabled, ep.name, dist):
            continue
        if pm.has_plugin(ep.name):  # the same distribution seen twice on sys.path
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as e:  # a broken plugin must not break commands that do not need it
            problems.append(Problem(ep.name, dist, f"{type(e).__name__}: {e}"))
            warn(f"plugin {ep.name!r} ({dist}) failed to load: {type(e).__name__}: {e}")
            continue
        _package_of[ep.name] = (dist, ep.dist.version if ep.dist else "")
    for env, names in ((LOAD_ENV, allowed or set()), (DISABLE_ENV, disabled)):
        for unknown in sorted(n for n in names if not named(seen, n)):
            warn(f"{env} names {unknown!r}, which is no installed plugin or distribution; see `slmops plugins`")


def plugin_manager() -> pluggy.PluginManager:
    """The plugin manager with every plugin registered; the first call loads them."""
    global _loaded
    if not _loaded:
        _loaded = True
        _load()
    return pm


def package_of(plugin_name: str) -> str:
    return _package_of.get(plugin_name, ("?", ""))[0]


def call_each(hook_name: str, arguments_for: Callable[[str], dict[str, Any]]) -> None:
    """Call one hook plugin by plugin, through pluggy, in the order the plugins were registered (built-ins first),
    with the arguments ``arguments_for(plugin_name)`` gives. A plugin whose hook raises is unregistered, with one
    warning that names it and the hook."""
    manager = plugin_manager()
    for impl in getattr(manager.hook, hook_name).get_hookimpls():
        plugin = impl.plugin
        if not manager.is_registered(plugin):
            continue
        others = [p for p in manager.get_plugins() if p is not plugin]
        try:
            manager.subset_hook_caller(hook_name, remove_plugins=others)(**arguments_for(impl.plugin_name))
        except Exception as e:
            disable(impl.plugin_name, hook_name, e)


def disable(plugin_name: str, hook_name: str, error: Exception) -> None:
    package = package_of(plugin_name)
    text = f"{type(error).__name__}: {error}"
    problems.append(Problem(plugin_name, package, text, hook_name))
    warn(f"plugin {plugin_name!r} ({package}) failed in {hook_name} and is disabled for this run: {text}")
    pm.unregister(name=plugin_name)


def plugin_table() -> list[dict[str, Any]]:
    """One row per loaded plugin: name, package, version, hooks."""
    rows = []
    for plugin in plugin_manager().get_plugins():
        name = pm.get_name(plugin)
        dist, version = _package_of.get(name, ("?", ""))
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        rows.append({"name": name, "package": dist, "version": version, "hooks": hooks})
    return sorted(rows, key=lambda r: (r["package"] != "slmops", r["name"]))
