"""What the plugins provide: one list per role (converters, quantizers, template families, registries,
benchmarkers), which plugin gave each implementation, and the choice of one by name."""

from __future__ import annotations

import functools
from typing import Any

from slmops.errors import NoImplementation, SlmopsError
from slmops.plugin.plugin_manager import call_each, package_of, plugin_manager, warn
from slmops.plugin.roles import Benchmarker, Converter, Quantizer, Registry, TemplateFamily

ROLES = {  # hook -> what one implementation is called in messages, and the class it must be
    "register_converters": ("converter", Converter),
    "register_quantizers": ("quantizer", Quantizer),
    "register_template_families": ("template family", TemplateFamily),
    "register_registries": ("registry", Registry),
    "register_benchmarkers": ("benchmarker", Benchmarker),
}
_provider: dict[int, tuple[Any, str, str]] = {}  # id(implementation) -> (implementation, plugin name, role)


def _wrong(obj: Any, kind: type) -> str | None:
    """What is wrong with an implementation handed to a role's register callback, or None."""
    if not isinstance(obj, kind):
        return f"got {type(obj).__name__}, not a {kind.__name__} (subclass slmops.api.{kind.__name__})"
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name.strip():
        return f"its name is {name!r}; give it a non-empty string name"
    return None


def _collect(hook_name: str) -> list[Any]:
    """Call one register_* hook of every plugin, recording which plugin registered each implementation.
    Names are unique per role: the first registered (built-ins come first) is kept, a later one is warned about."""
    found: dict[str, Any] = {}
    role, kind = ROLES[hook_name]

    def register(plugin: str, obj: Any) -> None:
        wrong = _wrong(obj, kind)
        if wrong:
            warn(f"plugin {plugin} (distribution {package_of(plugin)}), role {role}: {wrong}; it is ignored")
            return
        name = obj.name
        if name in found:
            first = plugin_of(found[name])
            warn(
                f"two {role} implementations are named {name!r}: {first}'s ({package_of(first)}) is used, "
                f"{plugin}'s ({package_of(plugin)}) is ignored; SLMOPS_DISABLE_PLUGINS={first} would pick the other"
            )
            return
        _provider[id(obj)] = (obj, plugin, role)
        found[name] = obj

    call_each(hook_name, lambda plugin: {"register": functools.partial(register, plugin)})
    # a plugin disabled half-way (its hook raised after registering something) gives nothing
    return [obj for obj in found.values() if plugin_manager().has_plugin(plugin_of(obj))]


def plugin_of(implementation: Any) -> str:
    """The name of the plugin that registered an implementation ('' if none did)."""
    entry = _provider.get(id(implementation))
    return entry[1] if entry and entry[0] is implementation else ""


def described(implementation: Any, method: str) -> str:
    """'plugin P (distribution D), role R, method M': how an error from a role method names where it came from."""
    entry = _provider.get(id(implementation))
    plugin, role = (entry[1], entry[2]) if entry and entry[0] is implementation else ("?", "?")
    return f"plugin {plugin} (distribution {package_of(plugin)}), role {role}, method {method}"


def blame(error: BaseException) -> str | None:
    """Where an exception left a plugin's role method (the outermost such frame of its traceback), described; None
    when no implementation's method is in it."""
    tb = error.__traceback__
    while tb is not None:
        this = tb.tb_frame.f_locals.get("self")
        if this is not None and plugin_of(this):
            return described(this, tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return None


def safely(implementation: Any, method: str, *args: Any, fallback: Any) -> Any:
    """implementation.method(*args); where it raises (other than SlmopsError, a message meant for the user) one
    warning names the plugin, role and method, and fallback is returned: for the calls every command makes (a
    converter's check(), a family's score()), so one broken plugin does not stop the commands others serve."""
    try:
        return getattr(implementation, method)(*args)
    except SlmopsError:
        raise
    except Exception as e:
        warn(f"{described(implementation, method)}: {type(e).__name__}: {e}; it is skipped")
        return fallback


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


def option_table() -> list[dict[str, Any]]:
    """Every converter's and quantizer's own options ([plugins.NAME] in slmops.toml, --option NAME.KEY=VALUE)."""
    return [
        {
            "option": f"{item.name}.{key}",
            "type": getattr(field.annotation, "__name__", str(field.annotation)),
            "default": field.default,
            "meaning": field.description or "",
            "plugin": plugin_of(item),
        }
        for item in [*converters(), *quantizers()]
        for key, field in item.Options.model_fields.items()
    ]


def clear_caches() -> None:
    for f in (converters, quantizers, template_families, registries, benchmarkers):
        f.cache_clear()
