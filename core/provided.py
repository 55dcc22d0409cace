"""What the plugins provide: one list per role (converters, quantizers, template families, registries,
benchmarkers), which plugin gave each implementation, and the choice of one by name."""

from __future__ import annotations

import functools
from typing import Any

from .errors import NoImplementation
from .plugin_manager import call_each, package_of, plugin_manager, warn
from .roles import Benchmarker, Converter, Quantizer, Registry, TemplateFamily

ROLES = {  # hook -> what one implementation is called in messages
    "register_converters": "converter",
    "register_quantizers": "quantizer",
    "register_template_families": "template family",
    "register_registries": "registry",
    "register_benchmarkers": "benchmarker",
}
_provider: dict[int, tuple[Any, str]] = {}  # id(implementation) -> (implementation, plugin name)


def _collect(hook_name: str) -> list[Any]:
    """Call one register_* hook of every plugin, recording which plugin registered each implementation.
    Names are unique per role: the first registered (built-ins come first) is kept, a later one is warned about."""
    found: dict[str, Any] = {}
    role = ROLES[hook_name]

    def register(plugin: str, obj: Any) -> None:
        name = getattr(obj, "name", "")
        if name in found:
            first = plugin_of(found[name])
            warn(
                f"two {role} implementations are named {name!r}: {first}'s ({package_of(first)}) is used, "
                f"{plugin}'s ({package_of(plugin)}) is ignored; SLMOPS_DISABLE_PLUGINS={first} would pick the other"
            )
            return
        _provider[id(obj)] = (obj, plugin)
        found[name] = obj

    call_each(hook_name, lambda plugin: {"register": functools.partial(register, plugin)})
    # a plugin disabled half-way (its hook raised after registering something) gives nothing
    return [obj for obj in found.values() if plugin_manager().has_plugin(plugin_of(obj))]


def plugin_of(implementation: Any) -> str:
    """The name of the plugin that registered an implementation ('' if none did)."""
    entry = _provider.get(id(implementation))
    return entry[1] if entry and entry[0] is implementation else ""


@functools.cache
def converters() -> list[Converter]:
    return _collect("register_converters")


@functools.cache
def quantizers() -> list[Quantizer]:
    return _collect("register_quantizers")


@functools.cache
def template_families() -> list[TemplateFamily]:
    return _collect("register_template_families")


@functools.cache
def registries() -> list[Registry]:
    return _collect("register_registries")


@functools.cache
def benchmarkers() -> list[Benchmarker]:
    return _collect("register_benchmarkers")


def by_name(items: list[Any], name: str, role: str) -> Any:
    for item in items:
        if item.name == name:
            return item
    known = ", ".join(i.name for i in items) or "none"
    raise NoImplementation(f"no {role} named {name!r}; installed: {known}")


def table() -> list[dict[str, str]]:
    """Every implementation: role, name, plugin and package."""
    lists = {
        "converter": converters(),
        "quantizer": quantizers(),
        "template family": template_families(),
        "registry": registries(),
        "benchmarker": benchmarkers(),
    }
    return [
        {
            "role": role,
            "name": item.name,
            "plugin": plugin_of(item),
            "package": package_of(plugin_of(item)),
            "description": getattr(item, "description", ""),
        }
        for role, items in lists.items()
        for item in items
    ]


def clear_caches() -> None:
    for f in (converters, quantizers, template_families, registries, benchmarkers):
        f.cache_clear()
