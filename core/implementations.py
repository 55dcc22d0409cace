"""The lists of registered implementations, one per role, and the choice among them."""

from __future__ import annotations

import functools
from typing import Any

from .errors import NoImplementation, SlmopsError
from .plugin_manager import pm
from .roles import Benchmarker, Converter, Quantizer, Registry, TemplateFamily


def _collect(hook_name: str) -> list[Any]:
    """Call one register_* hook of every plugin, tagging each object with the plugin that gave it."""
    found: list[Any] = []
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        def register(obj: Any, _plugin: str = impl.plugin_name) -> None:
            obj.plugin = _plugin
            found.append(obj)

        try:
            impl.function(register=register)
        except Exception as e:
            raise SlmopsError(f"plugin {impl.plugin_name!r} failed in {hook_name}: {type(e).__name__}: {e}") from e
    return found


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


def clear_caches() -> None:
    for f in (converters, quantizers, template_families, registries, benchmarkers):
        f.cache_clear()
