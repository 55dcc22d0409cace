"""The optional parts of slmops: each is an extra of the distribution (`pip install 'slmops[serve]'`), and a
command that needs one that is not installed says which, in one line, before it starts. `make install` installs
them all (`slmops[all]`). The core (running, benchmarking and checking a built model folder) needs none."""

from __future__ import annotations

import importlib.util

from slmops.errors import SlmopsError

# extra -> the modules it installs that slmops imports
EXTRAS: dict[str, tuple[str, ...]] = {
    "torch": ("torch", "peft", "accelerate"),  # building from a checkpoint, merging a LoRA, scoring against torch
    "olive": ("olive",),  # the Olive converter and the LoRA adapter extraction
    "foundry": ("foundry_local_sdk",),  # the Foundry Local registry
    "serve": ("fastapi", "uvicorn"),  # slmops serve
    "report": ("matplotlib",),  # plots in reports
}
# distribution name -> the extra that installs it (doctor's rows)
DISTRIBUTIONS = {
    "torch": "torch",
    "peft": "torch",
    "accelerate": "torch",
    "olive-ai": "olive",
    "foundry-local-sdk": "foundry",
    "fastapi": "serve",
    "uvicorn": "serve",
    "matplotlib": "report",
}


def extra_of(module: str) -> str | None:
    """The extra that installs a module (its top-level package), or None for a module of the core or none of ours."""
    top = module.split(".")[0]
    return next((extra for extra, modules in EXTRAS.items() if top in modules), None)


def missing(extra: str) -> list[str]:
    """The modules of an extra that cannot be imported here (found without importing them)."""
    gone = []
    for module in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            gone.append(module)
    return gone


INSTALL = "pip install 'slmops[{}]'"


def names_an_extra(line: str) -> bool:
    """Whether a problem line (a plugin's too) is problem()'s: an extra not installed, not something broken."""
    return INSTALL.split("{")[0] in line


def problem(extra: str, what: str) -> str | None:
    """One line saying that `what` (the work about to start) needs the extra, or None when it is installed."""
    gone = missing(extra)
    if not gone:
        return None
    return (
        f"{what} needs {', '.join(gone)}, which {'is' if len(gone) == 1 else 'are'} not installed: "
        f"{INSTALL.format(extra)} (make install installs every extra)"
    )


def need(extra: str, what: str) -> None:
    """Raise problem()'s line, if any."""
    line = problem(extra, what)
    if line:
        raise SlmopsError(line)
