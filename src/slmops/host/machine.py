"""What a model folder needs of the machine that runs it, and whether this machine has it. A plugin that puts native
code in a folder (the GGUF kernel) writes REQUIRES there; register, deploy and model run refuse, with the reason, a
folder this machine cannot run, instead of letting the runtime die on it."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from slmops.errors import SlmopsError

REQUIRES = "slmops-requires.json"  # {"what", "os", "machine": [...], "cpu_flags": [...]}

# Named targets: the OS (platform.system()) and CPU architectures (platform.machine()) a folder is built to run on.
NAMED_TARGETS = {
    "linux-x86_64": ("Linux", ("x86_64", "AMD64")),
    "linux-aarch64": ("Linux", ("aarch64", "arm64")),
    "macos-arm64": ("Darwin", ("arm64",)),
    "macos-x86_64": ("Darwin", ("x86_64",)),
    "windows-x86_64": ("Windows", ("AMD64", "x86_64")),
    "windows-arm64": ("Windows", ("ARM64", "aarch64")),
}
# native: this machine's fastest code; portable: none at all (runs wherever ONNX Runtime GenAI runs); a named target:
# native code where slmops builds it for that target here (the GGUF kernel: this machine's own platform), else none
TARGETS = ("native", "portable", *NAMED_TARGETS)


def this_target() -> str | None:
    """This machine's named target, or None where it is none of them."""
    here = (platform.system(), platform.machine())
    return next((name for name, (os, machines) in NAMED_TARGETS.items() if here[0] == os and here[1] in machines), None)


def native_code_for(target: str) -> bool:
    """Whether a build for target may carry native code built on this machine: for this machine ("native", or the
    name of this machine's own platform). Another platform's build gets the portable graph: the kernel installed here
    is this platform's."""
    return target == "native" or (target in NAMED_TARGETS and target == this_target())


def cpu_flags() -> set[str]:
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def requirements(model_dir: Path) -> dict[str, Any] | None:
    path = Path(model_dir) / REQUIRES
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise SlmopsError(f"{path} is damaged; convert the model again with `slmops convert`") from None
    return data if isinstance(data, dict) else None


def why_cannot_run(model_dir: Path) -> str | None:
    """Why this machine cannot run the folder (None if it can, or if the folder needs nothing special)."""
    needs = requirements(model_dir)
    if not needs:
        return None
    what = needs.get("what", "native code")
    if needs.get("os") and needs["os"] != platform.system():
        return f"it carries {what}, built for {needs['os']}; this is {platform.system()}"
    if needs.get("machine") and platform.machine() not in needs["machine"]:
        return f"it carries {what}, built for {'/'.join(needs['machine'])}; this is {platform.machine()}"
    missing = [f for f in needs.get("cpu_flags", []) if f not in cpu_flags()]
    if missing:
        return f"it carries {what}, which needs the CPU features {', '.join(missing)} that this CPU lacks"
    return None


def check_runs_here(model_dir: Path) -> None:
    why = why_cannot_run(model_dir)
    if why:
        raise SlmopsError(
            f"{model_dir} cannot run on this machine: {why}; convert the source again on this machine "
            "(slmops then builds what runs here)"
        )
