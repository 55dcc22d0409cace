"""make wheel-check: the built wheel in a clean virtual environment. `core`: installed without extras, it loads its
plugins, doctor finds nothing that fails, and each command that needs an extra says which in one line.
`all`: with every extra and the kernel's wheel, every plugin loads, doctor passes and the kernel library loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SLMOPS = str(Path(sys.executable).with_name("slmops"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SLMOPS, *args], capture_output=True, text=True, timeout=600)


def check_plugins_and_doctor() -> dict[str, dict]:
    """Every plugin loads and no doctor row fails; the rows by check."""
    names = {p["name"] for p in json.loads(run("plugins", "--json").stdout)["plugins"]}
    assert "slmops.plugins.gguf_native" in names, names
    rows = json.loads(run("doctor", "--json").stdout)
    bad = [r for r in rows if r["status"] == "fail"]
    assert not bad, bad
    print(f"wheel: {len(names)} plugins, doctor {len(rows)} checks without a failure")
    return {r["check"]: r for r in rows}


def refused(args: list[str], extra: str) -> None:
    done = run(*args)
    errors = [line for line in done.stderr.splitlines() if line.startswith("slmops: error")]
    assert done.returncode != 0 and len(errors) == 1 and f"slmops[{extra}]" in errors[0], done
    assert "Traceback" not in done.stderr, done.stderr
    print(f"wheel without extras: slmops {' '.join(args)} -> {errors[0]}")


if __name__ == "__main__":
    rows = check_plugins_and_doctor()
    if sys.argv[1] == "core":
        refused(["convert", "default", "--precision", "int8"], "torch")
        refused(["serve", "--port", "0"], "serve")
        assert "slmops[foundry]" in rows["registry foundry-local"]["detail"], rows
        assert rows["torch"]["status"] == "warn" and "slmops[torch]" in rows["torch"]["detail"], rows
    else:  # with the kernel's wheel beside slmops's: the library in the clean environment, loaded, running its code
        from slmops.plugins import gguf_kernel

        library = gguf_kernel.installed()
        assert library is not None and library.is_file(), "the slmops-kernel wheel carries no library"
        print(f"kernel wheel: {library.name} for {gguf_kernel.built_for(library)}, runs {gguf_kernel.code(library)}")
